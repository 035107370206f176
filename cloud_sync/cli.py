"""`eclm-cloud`: train the modular model into a module bank (and, later, run the merger daemon)."""

from __future__ import annotations

from pathlib import Path

import typer

from eclm.cli_support import make_app, reports_errors

app = make_app("The cloud side of ECLM: train the modular model into a versioned module bank.")


@app.callback()
def _root() -> None:
    """The cloud side of ECLM."""


@app.command()
@reports_errors
def train(
    dataset: str = typer.Option("digits", "--dataset", envvar="ECLM_DATASET",
                                help="'digits' (ships with scikit-learn) or an .npz with arrays X and y."),
    bank: Path = typer.Option(Path("bank"), "--bank", envvar="ECLM_BANK", help="Module bank directory to write."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data split, initialisation and order."),
    config: str = typer.Option("digits", "--config", help="Model configuration: digits or resnet18."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="End-to-end epochs (default from the config)."),
    enhance_epochs: int = typer.Option(None, "--enhance-epochs", min=0,
                                       help="Module ability-enhancing epochs (default from the config)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train end to end on the 30% proxy split, then enhance module ability, and write bank version 1.

    Same data, seed and config give the same bank (same bank id, same tensors).
    """
    from exporter.cloud import TrainOptions, train_bank
    from exporter.summary import bank_summary

    bars: dict[str, object] = {}

    def progress(stage: str, epoch: int, total: int, stats: dict[str, float]) -> None:
        if quiet:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="epoch", leave=True)
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})  # type: ignore[attr-defined]
        bar.update(1)  # type: ignore[attr-defined]
        if epoch == total:
            bar.close()  # type: ignore[attr-defined]

    info = train_bank(
        TrainOptions(dataset=dataset, bank_dir=bank, seed=seed, config=config, epochs=epochs,
                     enhance_epochs=enhance_epochs),
        progress,
    )
    typer.echo(bank_summary(info, str(bank)))


def main() -> None:
    app()
