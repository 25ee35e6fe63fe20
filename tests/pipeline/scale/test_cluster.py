"""The engine settings and the Ray connection's errors (no cluster needed)."""

from __future__ import annotations

import pytest

from pipeline.config import load_settings
from pipeline.errors import UserError
from pipeline.scale.cluster import check_reachable, free_port


def test_the_engine_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, home: object) -> None:
    assert load_settings().engine == "local" and load_settings().ray_address is None
    monkeypatch.setenv("ATTNREC_ENGINE", "ray")
    monkeypatch.setenv("ATTNREC_RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("ATTNREC_TRAIN__WORKERS", "2")
    s = load_settings()
    assert (s.engine, s.ray_address, s.train.workers, s.partitions) == ("ray", "ray://head:10001", 2, "auto")
    assert load_settings(engine="local").engine == "local"  # a CLI flag wins


@pytest.mark.parametrize(("overrides", "named"), [({"engine": "spark"}, "engine = 'spark'"),
                                                  ({"train.workers": 0}, "train.workers = 0"),
                                                  ({"partitions": 0}, "partitions = 0: Input should be greater than or equal to 1, or 'auto'"),
                                                  ({"ray_adress": "auto"}, "did you mean ray_address")])
def test_bad_engine_settings_are_one_named_error(overrides: dict, named: str, home: object) -> None:
    with pytest.raises(UserError, match=named):
        load_settings(**overrides)


@pytest.mark.parametrize("address", ["head", "ray://:10001", "host:port"])
def test_a_malformed_ray_address_is_refused(address: str) -> None:
    with pytest.raises(UserError, match="ray_address = .*give auto, host:port or ray://host:port"):
        check_reachable(address)


def test_nobody_listening_at_ray_address_is_refused_at_once() -> None:
    with pytest.raises(UserError, match="no Ray cluster answers there"):
        check_reachable(f"ray://127.0.0.1:{free_port()}")


def test_task_results_raise_a_tasks_user_error_as_one_line_and_cancel_the_rest(ray_cluster: str, home: object) -> None:
    import ray as ray_module

    from pipeline.scale.cluster import ray_connection, task_results

    def fails_with(kind: str, seconds: float) -> str:  # defined here: pickled by value for the workers
        import time

        time.sleep(seconds)
        if kind == "user":
            raise UserError("bucket 3: the file is damaged")
        if kind == "bug":
            raise ValueError("a bug")
        return "done"

    with ray_connection(load_settings(engine="ray", ray_address=ray_cluster)) as ray:
        task = ray.remote(num_cpus=1, max_retries=0)(fails_with)
        assert task_results(ray, [task.remote("ok", 0), task.remote("ok", 0)]) == ["done", "done"]
        slow = task.remote("ok", 60)
        with pytest.raises(UserError) as caught:
            task_results(ray, [task.remote("user", 0), slow])
        assert str(caught.value) == "bucket 3: the file is damaged"  # not Ray's text with the remote traceback
        assert not isinstance(caught.value, ray_module.exceptions.RayTaskError)
        ready, _ = ray.wait([slow], timeout=0)  # stopped before task_results raised, not left running for a minute
        assert ready
        with pytest.raises(ray_module.exceptions.TaskCancelledError):
            ray.get(slow)
        with pytest.raises(ray_module.exceptions.RayTaskError, match="a bug"):  # anything else: Ray's own error
            task_results(ray, [task.remote("bug", 0)])
