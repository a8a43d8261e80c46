"""One exception type for every mistake a user can make.

Entry points in `run/` catch `FgptError` and print its message as a single line, so bad
input never surfaces as a traceback from deep inside torch.
"""


class FgptError(ValueError):
    """A problem with the user's input: config, checkpoint, data or command-line flags."""


def check_at_least(flag: str, value: int | None, minimum: int) -> None:
    """The one wording for a count flag below its minimum (None: not given, nothing to check)."""
    if value is not None and value < minimum:
        raise FgptError(f"{flag} must be at least {minimum}, got {value}")


def require_extra(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise FgptError naming the extra that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.partition(".")[0]:
            raise
        raise FgptError(f"{purpose} needs {module}, which a plain install leaves out: "
                        f"pip install 'fgpt[{extra}]'") from None


def compiler_failure(error: BaseException) -> str:
    """The one warning line for a compile that failed."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"warning: torch.compile failed ({type(error).__name__}: {first}); "
            "training continues without compiling")
