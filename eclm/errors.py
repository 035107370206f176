"""The one error family of ECLM: every failure a user can cause, its exit code and what to do."""

from __future__ import annotations


class EclmError(Exception):
    """Root of every error ECLM raises on purpose; ``exit_code`` is what the CLI exits with."""

    exit_code = 1
    help = "An ECLM operation failed; the message says what went wrong."

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}\n  -> {hint}" if hint else message)


class UnknownProfileError(EclmError):
    exit_code = 10
    help = "The device profile is not in the registry; list them with `eclm-export --list-profiles`."


class ProfileFormatError(EclmError):
    exit_code = 11
    help = "A device profile file is malformed; see device_profiles/profiles/README.md for its keys."


class InfeasibleBudgetError(EclmError):
    exit_code = 12
    help = "Even the smallest sub-model exceeds a budget of the profile; pick a larger profile or a smaller model."


class BankError(EclmError):
    exit_code = 13
    help = "The module bank is missing, incomplete or corrupt; re-create it with `eclm-cloud train`."


class BundleError(EclmError):
    exit_code = 14
    help = "The bundle failed verification (missing file, hash mismatch, bad manifest); re-export it."


class ExportValidationError(EclmError):
    exit_code = 15
    help = "An exported ONNX graph disagrees with the PyTorch model, or its training step with PyTorch autograd."


class DataError(EclmError):
    exit_code = 16
    help = "Input data is malformed (wrong shape, dtype, non-finite values, unknown data set)."


class ConfigError(EclmError):
    exit_code = 17
    help = "A command-line option, configuration file or environment variable has an invalid value."


class TrainingUnavailableError(EclmError):
    exit_code = 18
    help = ("The serving bundle cannot train on this device (no step graph, or one this ONNX Runtime cannot load);"
            " it serves and collects samples only.")


class BrokerError(EclmError):
    exit_code = 19
    help = "The MQTT broker cannot be reached or refused the connection; check the URL, credentials and network."


ALL_ERRORS: tuple[type[EclmError], ...] = (
    EclmError,
    UnknownProfileError,
    ProfileFormatError,
    InfeasibleBudgetError,
    BankError,
    BundleError,
    ExportValidationError,
    DataError,
    ConfigError,
    TrainingUnavailableError,
    BrokerError,
)
