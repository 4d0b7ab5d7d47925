"""The JSON event contract as tests hold it: every event validates against the
schema the package ships (docs/events.md explains it), carries no field the
schema does not document (fields are added to the schema first), and reads
back into the typed model as written."""

from __future__ import annotations

from functools import cache
from typing import Any

from jsonschema import Draft202012Validator

from portrace.events import from_json, schema, to_json


@cache
def _validator() -> Draft202012Validator:
    s = schema()
    Draft202012Validator.check_schema(s)
    return Draft202012Validator(s)


def _documented(ev: dict[str, Any], props: dict[str, Any], where: str) -> None:
    extra = set(ev) - set(props)
    assert not extra, f"{where}: fields not in the schema: {sorted(extra)}"


def check(ev: dict[str, Any]) -> None:
    """Raises AssertionError naming the first violation."""
    errors = sorted(_validator().iter_errors(ev), key=lambda e: list(e.absolute_path))
    assert not errors, (f"{ev.get('type')} event: {errors[0].message} at "
                        f"{'/'.join(map(str, errors[0].absolute_path))}")
    defs = schema()["$defs"]
    _documented(ev, defs[f"{ev['type']}_event"]["properties"], ev["type"])
    holder_props = {**defs["process_facts"]["properties"],
                    **defs["holder"]["allOf"][1]["properties"]}
    for b in ev.get("blockers") or ():
        _documented(b, defs["blocker"]["properties"], "blocker")
        for p in b["processes"]:
            _documented(p, holder_props, "blocker process")
    if ev.get("process"):
        _documented(ev["process"], defs["process_facts"]["properties"], "process")
    # The typed model reads back exactly what was written (events.from_json).
    back = to_json(from_json(ev))
    changed = sorted(k for k in set(ev) | set(back) if ev.get(k) != back.get(k))
    assert not changed, f"{ev['type']} event does not read back as written: {changed}"
