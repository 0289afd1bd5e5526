"""The lab inventory: board instances and lab backends (``Lab``, by ``backend``, default static)."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from kiln.schema.base import Strict
from kiln.schema.transports import LocalTransport, Transport


def _unique_names(boards: list) -> None:
    names = [b.name for b in boards]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"board instance names must be unique, repeated: {sorted(dup)}")

class CommandPower(Strict):
    """A board's power through shell commands (a PDU's CLI, uhubctl, a relay script): ``on``,
    ``off`` and, optionally, ``cycle`` (else off, ``off_s`` seconds, on). Run by hil/lab/power.py
    with KILN_BOARD set to the board's name."""

    implementation: ClassVar[str] = "hil.lab.power"

    kind: Literal["command"]
    on: str = Field(min_length=1)
    off: str = Field(min_length=1)
    cycle: str | None = None
    off_s: float = Field(1.0, ge=0, le=60, description="seconds between off and on in a cycle without its own command")
    timeout_s: float = Field(30, gt=0, le=600)


class EmulatedPower(Strict):
    """An emulated board's power switch (hil/emulator/lab.py): off stops the board's processes
    (its sshd, its console), on starts them again with the same address and host key."""

    implementation: ClassVar[str] = "hil.emulator.lab"

    kind: Literal["emulated"]
    off_s: float = Field(0.2, ge=0, le=60)


def _labgrid_power_models() -> list[str] | None:
    """labgrid's PDU backends (labgrid/driver/power/<model>.py), found without importing labgrid;
    None when labgrid is not installed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("labgrid")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "driver" / "power"
    return sorted(f.stem for f in d.glob("*.py") if not f.stem.startswith("_"))


class LabgridPower(Strict):
    """A board's PDU port switched by labgrid's own power backends (a ``NetworkPowerPort`` with
    labgrid's ``model``: netio, gude, apc, raritan, simplerest, ...) through labgrid's
    NetworkPowerDriver (hil/lab/labgrid/power.py), for a static lab where labgrid is installed."""

    implementation: ClassVar[str] = "hil.lab.labgrid.power"

    kind: Literal["labgrid"]
    model: str = Field(description="labgrid's power backend: a module of labgrid.driver.power")
    host: str = Field(min_length=1, description="the PDU's host (or URL, for the rest/simplerest models)")
    index: int = Field(0, ge=0, description="the PDU's outlet")
    delay_s: float = Field(1.0, ge=0, le=60, description="seconds between off and on in a cycle")

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        models = _labgrid_power_models()
        if models is None:
            raise ValueError("power kind 'labgrid' needs labgrid installed (pip install labgrid)")
        if v not in models:
            raise ValueError(f"'{v}' is not one of labgrid's power backends ({', '.join(models)})")
        return v


class LabgridPlacePower(Strict):
    """A labgrid lab's board: its place's own power resource (an exported NetworkPowerPort,
    PDUDaemonPort, USB power port...) switched by labgrid's driver for it while Kiln holds the
    place (hil/lab/labgrid/power.py). The labgrid lab gives it to every place with one."""

    implementation: ClassVar[str] = "hil.lab.labgrid.power"

    kind: Literal["labgrid-place"]
    coordinator: str = Field(pattern=r"^[A-Za-z0-9_.:\[\]-]+:[0-9]{1,5}$")
    place: str = Field(min_length=1)
    delay_s: float = Field(1.0, ge=0, le=60)
    lease_ttl_s: float = Field(15, ge=1, le=600)


Power = Annotated[Union[CommandPower, EmulatedPower, LabgridPower, LabgridPlacePower], Field(discriminator="kind")]


class Instance(Strict):
    """A board *instance* in a lab: a type, a transport and tags; one model whatever started
    the board (a static inventory, the emulated lab, ...)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    type: str = Field(description="a board type from targets/*.yaml")
    transport: Transport = Field(default_factory=LocalTransport)
    emulated: bool = Field(
        False, description="runs on this machine under its type's emulation (e.g. qemu-user); "
        "its latency is reported, not enforced"
    )
    tags: list[str] = Field(default_factory=list)
    power: Power | None = Field(None, description="how the board's power is switched (on/off/cycle); "
                                "a board with it is power-cycled before it is marked bad")

    @property
    def link(self) -> str:
        return self.transport.kind


class _LabBase(Strict):
    implementation: ClassVar[str]
    provides_transports: ClassVar[bool] = False

    name: str = "lab"
    boards: list[Instance] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        _unique_names(self.boards)
        if not self.provides_transports:
            for i, b in enumerate(self.boards):
                missing = [f for f in type(b.transport).provided if getattr(b.transport, f) is None]
                if missing:
                    raise ValueError(f"boards.{i}.transport ({b.name}, {b.transport.kind}): missing "
                                     f"{', '.join(missing)} (only a lab backend that starts its boards provides them)")
        return self


class StaticLab(_LabBase):
    """A lab of boards that are already there: every transport is given in full (hil/lab/static.py)."""

    implementation: ClassVar[str] = "hil.lab.static"

    backend: Literal["static"] = "static"


class EmulatedLab(_LabBase):
    """The default lab (hil/emulator/lab.yaml): Kiln starts each board on this machine (a real
    sshd per SSH board, a real pty per serial board) and fills in its transport; once up it is
    a static inventory (build/lab/inventory.yaml). Provider: hil/emulator/lab.py."""

    implementation: ClassVar[str] = "hil.emulator.lab"
    provides_transports: ClassVar[bool] = True

    backend: Literal["emulated"]
    name: str = "emulated"


class LabgridSSH(Strict):
    """How Kiln logs in to the SSH boards of a labgrid lab: a place's ``NetworkService`` gives the
    address, port and user; the key and known_hosts are the runner's own."""

    user: str | None = Field(None, description="login, when the NetworkService names none")
    key: str | None = Field(None, description="private key file; relative paths are relative to the lab file")
    known_hosts: str | None = Field(None, description="known_hosts with every board's host key")
    accept_unknown_host_key: bool = False
    connect_timeout_s: float = Field(5, gt=0)
    retries: int = Field(2, ge=0, le=20)


class EmulatedHosts(Strict):
    """A multi-host labgrid lab on this machine (hil/emulator/multihost.py): a coordinator,
    exporter "hosts" and runner namespaces, each in its own network namespace."""

    exporters: dict[str, list[str]] = Field(min_length=1, description="exporter host -> the boards it exports")
    runners: list[str] = Field(default_factory=lambda: ["run1", "run2"], description="runner namespaces")

    @field_validator("exporters", "runners")
    @classmethod
    def _names(cls, v):
        for n in (v if isinstance(v, list) else list(v)):
            if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", n):
                raise ValueError(f"'{n}': a host name here is 1-8 lowercase letters and digits, starting with a letter")
        return v


class LabgridLab(Strict):
    """A lab on many hosts, driven through a labgrid coordinator (hil/lab/labgrid/): each
    board is a place tagged ``kiln_type=<board type>``; Kiln acquires places through labgrid's
    client API, renews a lease on each, and reaches the boards over its own SSH and serial
    (RFC2217) transports. ``boards`` may be left out: the places are then found on the
    coordinator by their tags."""

    implementation: ClassVar[str] = "hil.lab.labgrid"
    emulated_by: ClassVar[str] = "hil.emulator.multihost"  # with ``emulate``: starts the lab, then hil.lab.labgrid
    provides_transports: ClassVar[bool] = True

    backend: Literal["labgrid"]
    name: str = "labgrid"
    coordinator: str = Field(pattern=r"^[A-Za-z0-9_.:\[\]-]+:[0-9]{1,5}$", description="HOST:PORT of labgrid-coordinator")
    boards: list[Instance] = Field(default_factory=list, description="the places Kiln expects (optional)")
    ssh: LabgridSSH = Field(default_factory=LabgridSSH)
    lease_ttl_s: float = Field(15, ge=1, le=600, description="a lease not renewed for this long lapses; the reaper frees its place")
    connect_timeout_s: float = Field(10, gt=0, description="how long to wait for the coordinator")
    emulate: EmulatedHosts | None = Field(None, description="start this lab on this machine (hil/emulator/multihost.py)")

    @model_validator(mode="after")
    def _check(self):
        _unique_names(self.boards)
        if self.emulate:
            listed = [b for names in self.emulate.exporters.values() for b in names]
            names = [b.name for b in self.boards]
            missing = sorted(set(names) - set(listed))
            unknown = sorted(set(listed) - set(names))
            if missing or unknown or len(listed) != len(set(listed)):
                raise ValueError(f"emulate.exporters must list each board of 'boards' exactly once "
                                 f"(not exported: {missing or 'none'}; not a board: {unknown or 'none'})")
            local = [b.name for b in self.boards if b.link == "local"]
            if local:
                raise ValueError(f"boards {local}: a board on an exporter host is reached over ssh or serial, not local")
        return self


def _backend(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("backend", "static")
    return getattr(v, "backend", "static")


Lab = Annotated[Union[Annotated[StaticLab, Tag("static")], Annotated[EmulatedLab, Tag("emulated")],
                      Annotated[LabgridLab, Tag("labgrid")]],
                Discriminator(_backend, custom_error_type="lab_backend",
                              custom_error_message="unknown lab backend (expected 'static', 'emulated' or 'labgrid')")]
Inventory = StaticLab  # what every backend hands back once its boards are up
