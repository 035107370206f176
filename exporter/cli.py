"""`eclm-export`: cut a device's sub-model from the bank and write its bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from eclm.cli_support import make_app, parse_int_list, reports_errors

app = make_app("Derive a device's sub-model from the module bank and export it as a checked ONNX bundle.")


@app.command()
@reports_errors
def export(
    profile: str = typer.Option(None, "--profile", "-p", envvar="ECLM_PROFILE", show_default="none",
                                help="Device profile name (see --list-profiles); required to export."),
    bank: str = typer.Option("bank", "--bank", envvar="ECLM_BANK",
                              help="Module bank: a directory or postgresql://USER@HOST[:PORT]/DB."),
    out: Path = typer.Option(None, "--out", "-o", envvar="ECLM_EXPORT_OUT", show_default="bundles/<profile>",
                             help="Bundle directory to write."),
    importance: Path = typer.Option(None, "--importance", envvar="ECLM_IMPORTANCE", exists=True, dir_okay=False,
                                    show_default="none",
                                    help="Importance JSON a device reported (schema_version 1, 'layers')."),
    classes: str = typer.Option(None, "--classes", envvar="ECLM_CLASSES", show_default="none: the bank's proxy data",
                                help="Derive for these class indices, e.g. 1,4,7."),
    profiles_dir: Path = typer.Option(None, "--profiles-dir", envvar="ECLM_PROFILES_DIR", show_default="none",
                                      help="Folder(s) of <name>.toml device profiles, searched after the built-in "
                                      "ones (several separated by ':'); a profile there overrides one of the same "
                                      "name."),
    list_profiles: bool = typer.Option(False, "--list-profiles", help="Print profile names, one per line, and exit."),
    no_measure: bool = typer.Option(False, "--no-measure", envvar="ECLM_NO_MEASURE", show_default="off",
                                    help="Skip the measurement subprocesses."),
    signing_key: Path = typer.Option(None, "--signing-key", envvar="ECLM_SIGNING_KEY", exists=True, dir_okay=False,
                                     show_default="none: unsigned",
                                     help="Sign the manifest with this Ed25519 key (from `eclm-cloud keys`)."),
    device_id: str = typer.Option(None, "--device-id", envvar="ECLM_EXPORT_DEVICE_ID", show_default="none: any device",
                                  help="Make the bundle for this device only (the manifest names it)."),
) -> None:
    """Write a bundle: model.onnx, selector.onnx, training/train_step.onnx (if the board trains), manifest.json.

    The sub-model maximises module importance (from --importance, --classes, or the bank's proxy
    data) within the profile's memory, compute and transfer budgets. The exporter checks ONNX
    Runtime against PyTorch (within 1e-4 of the outputs' scale plus 1e-3 relative), checks the
    training step graph against PyTorch autograd over ten steps, and measures memory and latency
    in a torch-free subprocess.
    """
    from device_profiles import available_profiles

    if list_profiles:
        for name in available_profiles(profiles_dir):
            typer.echo(name)
        return
    if profile is None:
        from eclm.errors import ConfigError

        raise ConfigError("--profile is required", hint="list them with `eclm-export --list-profiles`")
    if importance is not None and classes:
        from eclm.errors import ConfigError

        raise ConfigError("give --importance or --classes, not both", hint="drop one of them")
    from exporter.export import ExportRequest, export_bundle
    from exporter.summary import bundle_summary

    out_dir = out or Path("bundles") / profile
    manifest = export_bundle(
        ExportRequest(
            bank_dir=bank,
            profile=profile,
            out_dir=out_dir,
            classes=parse_int_list(classes, "--classes"),
            importance_file=importance,
            profiles_dir=profiles_dir,
            measure=not no_measure,
            signing_key=signing_key,
            device_id=device_id,
        ),
        step=lambda msg: typer.echo(f"- {msg}", err=True),
    )
    typer.echo(bundle_summary(manifest, str(out_dir)))


def main() -> None:
    app()
