"""`eclm-edge`: the board's command; today it verifies and describes bundles."""

from __future__ import annotations

from pathlib import Path

import typer

from eclm.cli_support import make_app, reports_errors

app = make_app("ECLM on the board: check a bundle before serving it.")


@app.callback()
def _root() -> None:
    """ECLM on the board."""


@app.command()
@reports_errors
def verify(bundle: Path = typer.Option(..., "--bundle", "-b", envvar="ECLM_BUNDLE", help="Bundle directory.")) -> None:
    """Check every file of a bundle against the sha256 in its manifest; exit 14 on any mismatch."""
    from eclm.manifest import verify_bundle

    man = verify_bundle(bundle)
    typer.echo(f"bundle {bundle} verified: {len(man.files)} files, profile {man.profile['name']}, "
               f"bank {man.bank_id}, training {'yes' if man.training['available'] else 'no'}")


def main() -> None:
    app()
