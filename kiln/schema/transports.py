"""Transports (``Transport``, by ``kind``): how the host reaches a board instance
(implementations: hil/transport/<kind>.py)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field

from kiln.schema.base import Strict


# --- lab inventory: transports (by kind) and lab backends (by backend) ------------------------
# A transport's connection fields may be left out only where the lab's backend provides them
# (the emulated lab starts the board and fills them in); a static inventory must give them.


class LocalTransport(Strict):
    """The board is this machine: commands are subprocesses, files are copies."""

    implementation: ClassVar[str] = "hil.transport.local"
    provided: ClassVar[tuple[str, ...]] = ()

    kind: Literal["local"] = "local"


class SSHTransport(Strict):
    """A Linux board on a network, reached with OpenSSH (fabric/paramiko)."""

    implementation: ClassVar[str] = "hil.transport.ssh"
    provided: ClassVar[tuple[str, ...]] = ("host", "user", "key", "known_hosts")

    kind: Literal["ssh"]
    host: str | None = Field(None, description="address of the board (required unless the lab backend provides it)")
    port: int = Field(22, ge=1, le=65535)
    user: str | None = Field(None, description="login on the board (required unless the lab backend provides it)")
    key: str | None = Field(None, description="private key file; relative paths are relative to the inventory file")
    known_hosts: str | None = Field(None, description="known_hosts file the lab provides; the board's host key must be in it")
    accept_unknown_host_key: bool = Field(
        False, description="trust a host key not in known_hosts (first contact only); off by default"
    )
    workdir: str = Field("kiln", description="work directory on the board (relative to the login's home)")
    connect_timeout_s: float = Field(10, gt=0)
    retries: int = Field(3, ge=0, le=20, description="retries of a failed step where a retry is safe")


class SerialTransport(Strict):
    """A board reached only through a serial console (a UART, or a pty in the emulated lab)."""

    implementation: ClassVar[str] = "hil.transport.serial"
    provided: ClassVar[tuple[str, ...]] = ("port",)

    kind: Literal["serial"]
    port: str | None = Field(None, description="serial device, e.g. /dev/ttyUSB0 (required unless the lab backend provides it)")
    baud: int = Field(115200, gt=0)
    workdir: str = Field("/tmp/kiln", description="work directory on the board")
    chunk_bytes: int = Field(4096, ge=64, le=65536, description="payload bytes per upload frame")
    retries: int = Field(5, ge=0, le=50, description="retransmissions of one frame before giving up")
    timeout_s: float = Field(10, gt=0, description="how long to wait for the board to answer one frame or prompt")


Transport = Annotated[Union[LocalTransport, SSHTransport, SerialTransport], Field(discriminator="kind")]
