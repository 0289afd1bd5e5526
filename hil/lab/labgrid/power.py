"""Power through labgrid's own drivers (kiln.schema.LabgridPower, LabgridPlacePower): no PDU
code of Kiln's. labgrid ships the backends (labgrid.driver.power.<model>: netio, gude, apc,
raritan, simplerest, ...) and the drivers (NetworkPowerDriver, PDUDaemonDriver, USBPowerDriver,
...) behind one PowerProtocol; Kiln builds a labgrid ``Target`` holding the power resource and
activates labgrid's driver for it, as ``labgrid-client power`` does.

``kind: labgrid`` (a static lab): the board's PDU port as the inventory gives it
    (``NetworkPowerPort`` with its model, host and index).
``kind: labgrid-place`` (a labgrid lab): the place's own power resource, as its exporter
    publishes it, switched only while this runner holds the place (a job's lease; by hand, the
    place is acquired for the switch and released after).
"""

from __future__ import annotations

import contextlib
import logging
import time
from types import SimpleNamespace

from hil.lab.power import PowerError

log = logging.getLogger("kiln.labgrid")

# a power resource an exporter can publish -> the labgrid driver that switches it (labgrid's
# client picks them the same way in its ``power`` command)
DRIVERS = {
    "NetworkPowerPort": "NetworkPowerDriver",
    "PDUDaemonPort": "PDUDaemonDriver",
    "NetworkUSBPowerPort": "USBPowerDriver",
    "NetworkSiSPMPowerPort": "SiSPMPowerDriver",
    "TasmotaPowerPort": "TasmotaPowerDriver",
    "NetworkYKUSHPowerPort": "YKUSHPowerDriver",
}
ACQUIRE_TIMEOUT_S = 30.0


def power_resources(place: dict) -> list[dict]:
    """The place's resources that labgrid can switch power with (hil.lab.labgrid.client's view)."""
    return [r for r in place.get("resources", []) if r["cls"] in DRIVERS]


def _switch(board: str, cls: str, args: dict, action: str, delay_s: float, extra: dict | None = None) -> None:
    """``action`` through labgrid's driver for one power resource of class ``cls``."""
    try:
        import attr
        from labgrid import Target
        from labgrid.factory import target_factory
        import labgrid.driver  # noqa: F401  (registers labgrid's drivers with its factory)
        import labgrid.resource  # noqa: F401
    except ImportError as e:
        raise PowerError(f"board {board}: power through labgrid needs labgrid installed (pip install labgrid): "
                         f"{e}") from e
    target = Target(f"kiln-{board}")
    try:
        res = target_factory.make_resource(target, cls, None, dict(args))
        if extra is not None:  # an exported resource: labgrid's proxy settings for its host
            res.extra, res.avail = extra, True
        fields = attr.fields_dict(target_factory.drivers[DRIVERS[cls]])  # the off-on delay, where it has one
        drv = target_factory.make_driver(target, DRIVERS[cls], None,
                                         {"delay": float(delay_s)} if "delay" in fields else {})
        target.activate(drv)
        getattr(drv, action)()
    except Exception as e:  # labgrid's own errors (InvalidConfigError, ExecutionError), requests', OSError
        raise PowerError(f"board {board}: power {action} through labgrid's {DRIVERS[cls]} ({cls} "
                         f"{ {k: v for k, v in args.items() if k != 'extra'} }) failed: {type(e).__name__}: {e}") from e
    finally:
        with contextlib.suppress(Exception):
            target.cleanup()


def power(instance, action: str, spec) -> None:
    if spec.kind == "labgrid":
        _switch(instance.name, "NetworkPowerPort", {"model": spec.model, "host": spec.host, "index": spec.index},
                action, spec.delay_s)
        return
    _place_power(instance, action, spec)


def _place_power(instance, action: str, spec) -> None:
    from hil.lab.labgrid import client_for
    from hil.lab.labgrid.lease import acquire_place

    lab = SimpleNamespace(coordinator=spec.coordinator, lease_ttl_s=spec.lease_ttl_s, connect_timeout_s=10.0)
    client = client_for(lab)
    p = client.places().get(spec.place)
    if p is None:
        raise PowerError(f"board {instance.name}: labgrid coordinator {spec.coordinator} has no place '{spec.place}'")
    found = power_resources(p)
    if not found:
        raise PowerError(f"board {instance.name}: place '{spec.place}' has no power resource labgrid can switch "
                         f"(its resources: {', '.join(r['path'] for r in p['resources']) or 'none'}; one of "
                         f"{', '.join(DRIVERS)})")
    lease = None
    if p["acquired"] != client.identity:  # by hand: hold the place for the switch
        lease = acquire_place(client, spec.place, wait=True, timeout_s=ACQUIRE_TIMEOUT_S)
        if lease is None:
            raise PowerError(f"board {instance.name}: place '{spec.place}' is held by "
                             f"{client.places().get(spec.place, {}).get('acquired')}: its power is switched only "
                             f"by its holder (waited {ACQUIRE_TIMEOUT_S:g} s)")
    try:
        r = found[0]
        args = {k: v for k, v in r["params"].items() if k != "extra"}
        t0 = time.perf_counter()
        _switch(instance.name, r["cls"], args, action, spec.delay_s, r["params"].get("extra", {}))
        log.info("place %s: power %s through labgrid's %s (%s) in %.2f s", spec.place, action, DRIVERS[r["cls"]],
                 r["path"], time.perf_counter() - t0)
    finally:
        if lease is not None:
            lease.release()
