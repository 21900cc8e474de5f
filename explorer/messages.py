"""An exception as the one sentence a user reads (the CLI's ``error:`` line, the app's status)."""

from __future__ import annotations

from pydantic import ValidationError


def user_message(e: BaseException) -> str:
    """The text of ``e`` without library boilerplate.

    A pydantic ValidationError gives its messages joined by "; " (our validators' sentences, without
    pydantic's "Value error, " prefix, input dump and documentation link; a field's own error prefixed
    by the field); a KeyError its message unquoted; anything else ``str(e)``, else the type's name.
    """
    if isinstance(e, ValidationError):
        return "; ".join(_validation_text(err) for err in e.errors())
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def _validation_text(err: dict) -> str:
    if err["type"] == "value_error":
        return err["msg"].removeprefix("Value error, ")
    where = ".".join(str(part) for part in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]
