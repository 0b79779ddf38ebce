"""The agent's exception hierarchy: one root, the tree its docstring draws, no exception defined elsewhere."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

import agent_stub
from agent_stub import errors
from agent_stub.errors import (
    AgentAlreadyRunningError,
    AgentError,
    AgentNotRunningError,
    ContentRejected,
    CorruptStateError,
    FactsFileError,
    LinkDisconnected,
    LinkError,
    LinkRefused,
    LinkUnavailable,
    ManagerBadResponse,
    ManagerError,
    ManagerRejected,
    ManagerUnreachable,
    ManagerUntrusted,
    NotEnrolledError,
    TrustError,
)

PARENTS: dict[type[Exception], tuple[type[Exception], ...]] = {
    AgentError: (Exception,),
    NotEnrolledError: (AgentError,),
    CorruptStateError: (AgentError,),
    FactsFileError: (AgentError, ValueError),
    ContentRejected: (AgentError,),
    AgentNotRunningError: (AgentError,),
    AgentAlreadyRunningError: (AgentError,),
    TrustError: (AgentError,),
    ManagerError: (AgentError,),
    ManagerUnreachable: (ManagerError,),
    ManagerBadResponse: (ManagerUnreachable,),
    ManagerUntrusted: (ManagerUnreachable,),
    ManagerRejected: (ManagerError,),
    LinkError: (AgentError,),
    LinkUnavailable: (LinkError,),
    LinkDisconnected: (LinkUnavailable,),
    LinkRefused: (LinkError,),
}


def test_every_class_of_the_module_is_in_the_tree_with_its_bases() -> None:
    classes = inspect.getmembers(errors, inspect.isclass)
    defined = {obj for _, obj in classes if obj.__module__ == errors.__name__}
    assert defined == set(PARENTS)
    for cls, bases in PARENTS.items():
        assert cls.__bases__ == bases, cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} is missing from the drawn hierarchy"


def test_facts_file_errors_are_still_value_errors() -> None:
    with pytest.raises(ValueError, match="bad facts"):
        raise FactsFileError("bad facts")


def test_the_errors_with_fields_keep_them() -> None:
    rejected = ManagerRejected(403, "revoked")
    assert (str(rejected), rejected.status, rejected.detail, rejected.unauthorized) == (
        "HTTP 403: revoked",
        403,
        "revoked",
        True,
    )
    assert not ManagerRejected(413, "too large").unauthorized

    refused = LinkRefused("subscribe to t", ReasonCode(PacketTypes.SUBACK, "Not authorized"))
    assert (refused.operation, refused.reason_code) == ("subscribe to t", 0x87)
    assert refused.reason == "Not authorized"
    assert str(refused) == "subscribe to t: refused by the broker: Not authorized (0x87)"


def _agent_modules() -> list[str]:
    root = Path(agent_stub.__file__).parent
    return [info.name for info in pkgutil.walk_packages([str(root)], prefix="agent_stub.")]


@pytest.mark.parametrize("module", _agent_modules())
def test_no_other_module_defines_a_public_exception(module: str) -> None:
    """Elsewhere only private helpers, and those subclass the hierarchy."""
    loaded = importlib.import_module(module)
    tree = ast.parse(Path(loaded.__file__ or "").read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(loaded, node.name, None)
        if not (inspect.isclass(cls) and issubclass(cls, BaseException)) or module == errors.__name__:
            continue
        assert node.name.startswith("_"), f"{module}.{node.name} belongs in agent_stub.errors"
        assert issubclass(cls, AgentError), f"{module}.{node.name} is outside the hierarchy"
