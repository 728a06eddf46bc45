"""cloud_init_state reads /run/cloud-init/{status,result}.json as `cloud-init status` does."""

from __future__ import annotations

import json

import pytest

from pytest_flightvm.vm.ready import _SEP, cloud_init_state


def _stage(errors: list[str] | None = None, finished: float | None = 1.0) -> dict[str, object]:
    return {"errors": errors or [], "start": 0.5, "finished": finished}


def _out(status: dict[str, object] | None, result: dict[str, object] | None) -> str:
    s = json.dumps({"v1": status}) if status is not None else ""
    r = json.dumps({"v1": result}) if result is not None else ""
    return f"{s}\n{_SEP}\n{r}"


RUNNING = {"stage": "modules-config", "datasource": "DataSourceNoCloud",
           "init-local": _stage(), "init": _stage(), "modules-config": _stage(finished=None),
           "modules-final": {"errors": [], "start": None, "finished": None}}
DONE = {"stage": None, "datasource": "DataSourceNoCloud", "init-local": _stage(),
        "init": _stage(), "modules-config": _stage(), "modules-final": _stage()}


@pytest.mark.parametrize(("output", "want"), [
    ("", ("absent", "")),
    (f"\n{_SEP}\n", ("absent", "")),
    ("cat: /run/cloud-init/status.json: No such file\n" + _SEP, ("absent", "")),
    (_out(RUNNING, None), ("running", "")),
    (_out(DONE, {"datasource": "DataSourceNoCloud", "errors": []}), ("done", "")),
])
def test_states(output: str, want: tuple[str, str]) -> None:
    assert cloud_init_state(output) == want


def test_a_stage_error_is_reported_before_the_final_stage_ends() -> None:
    status = dict(RUNNING, init=_stage(errors=["('users_groups', KeyError('x'))"]))
    state, detail = cloud_init_state(_out(status, None))
    assert state == "error"
    assert detail == "init: ('users_groups', KeyError('x'))"


def test_errors_in_both_files_are_listed_once() -> None:
    err = "('scripts_user', RuntimeError('runparts: 1 failures'))"
    status = dict(DONE, **{"modules-final": _stage(errors=[err])})
    state, detail = cloud_init_state(_out(status, {"datasource": "x", "errors": [err]}))
    assert (state, detail) == ("error", f"modules-final: {err}")


def test_a_half_written_result_file_is_not_done_yet() -> None:
    assert cloud_init_state(_out(RUNNING, None) + '{"v1": {"datas')[0] == "running"
