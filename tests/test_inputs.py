"""The pixel budget: decoded pixels in flight are bounded across every decoding thread of
the process (the check's and the model-input path's), in arrival order."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.demo import encode
from tasks.check import inspect_image
from tasks.inputs import PIXELS_IN_FLIGHT, PixelBudget, decode_then, load_model_inputs
from tasks.storage import open_storage


def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class _Holder:
    """A thread that holds `pixels` of `budget` until released."""

    def __init__(self, budget: PixelBudget, pixels: int) -> None:
        self.admitted, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(budget, pixels), daemon=True)
        self._thread.start()

    def _run(self, budget: PixelBudget, pixels: int) -> None:
        with budget.hold(pixels):
            self.admitted.set()
            self._release.wait()

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)


def test_images_are_admitted_while_they_fit_and_the_next_waits() -> None:
    budget = PixelBudget(100)
    first, second = _Holder(budget, 60), _Holder(budget, 30)
    assert first.admitted.wait(30) and second.admitted.wait(30)
    third = _Holder(budget, 20)
    _until(lambda: budget.waiting == 1)
    assert budget.held == 90 and not third.admitted.is_set()
    first.release()
    assert third.admitted.wait(30)
    assert budget.held == 50
    second.release(), third.release()
    assert budget.held == 0


def test_an_image_larger_than_the_whole_budget_decodes_alone() -> None:
    budget = PixelBudget(100)
    small = _Holder(budget, 10)
    assert small.admitted.wait(30)
    large = _Holder(budget, 500)
    _until(lambda: budget.waiting == 1)
    small.release()
    assert large.admitted.wait(30) and budget.held == 500
    tiny = _Holder(budget, 1)
    _until(lambda: budget.waiting == 1)
    assert not tiny.admitted.is_set()
    large.release()
    assert tiny.admitted.wait(30)
    tiny.release()


def test_waiting_images_are_admitted_in_arrival_order() -> None:
    """A small image that would fit does not overtake a large one waiting before it, so a
    stream of small images cannot starve a large one."""
    budget = PixelBudget(100)
    held = _Holder(budget, 60)
    assert held.admitted.wait(30)
    large = _Holder(budget, 50)
    _until(lambda: budget.waiting == 1)
    small = _Holder(budget, 10)  # 70 would fit, but the large one came first
    _until(lambda: budget.waiting == 2)
    assert not small.admitted.is_set()
    held.release()
    assert large.admitted.wait(30) and small.admitted.wait(30)
    large.release(), small.release()


def test_decode_then_holds_the_images_pixels_until_use_returns() -> None:
    budget = PixelBudget(10**9)
    data = encode(Image.new("RGB", (120, 80), "red"), "JPEG")
    seen = decode_then(data, 10**9, lambda decoded: budget.held, budget=budget)
    assert seen == 120 * 80 and budget.held == 0
    # A JPEG drafted to about 16 px is held at its drafted size.
    drafted = decode_then(
        data, 10**9, lambda d: budget.held, full_check=False, draft_size=16, budget=budget
    )
    assert isinstance(drafted, int) and drafted <= 30 * 20
    assert decode_then(b"", 10**9, lambda d: budget.held, budget=budget) == "zero bytes"


@contextmanager
def _process_budget_full() -> Iterator[None]:
    """Every pixel of the process's budget held by this test."""
    limit = PIXELS_IN_FLIGHT.limit
    PIXELS_IN_FLIGHT.set_limit(1000)
    try:
        with PIXELS_IN_FLIGHT.hold(1000):
            yield
    finally:
        PIXELS_IN_FLIGHT.set_limit(limit)


def test_the_check_and_the_model_input_path_share_the_process_budget(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(encode(Image.new("RGB", (40, 30), "blue"), "PNG"))
    data = (tmp_path / "a.png").read_bytes()
    results: dict[str, object] = {}

    def check() -> None:
        results["check"] = inspect_image("a.png", data, 10**9, True, 16)

    def model_inputs() -> None:
        results["inputs"] = load_model_inputs(open_storage(str(tmp_path)), ["a.png"], None, 16, 1)

    with _process_budget_full():
        threads = [threading.Thread(target=f, daemon=True) for f in (check, model_inputs)]
        for thread in threads:
            thread.start()
        _until(lambda: PIXELS_IN_FLIGHT.waiting == 2)
        assert not results
    for thread in threads:
        thread.join(30)
    row, pixels = results["check"]  # type: ignore[misc]
    assert row["width"] == 40 and pixels.shape == (16, 16, 3)
    inputs = results["inputs"]
    assert isinstance(inputs, np.ndarray) and np.array_equal(inputs[0], pixels)


@pytest.mark.parametrize("threads", [1, 4])
def test_a_check_never_holds_more_than_the_budget_whatever_its_threads(
    tmp_path: Path, threads: int
) -> None:
    """`check_images` under a budget of one image's pixels holds one image at a time (the
    budget's own `hold`, watched)."""
    from tasks.check import check_images

    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(encode(Image.new("RGB", (50, 40), (i, 0, 0)), "PNG"))
    budget_peak = [0]
    limit = PIXELS_IN_FLIGHT.limit
    PIXELS_IN_FLIGHT.set_limit(50 * 40)
    original = PIXELS_IN_FLIGHT.hold

    @contextmanager
    def watched(pixels: int) -> Iterator[None]:
        with original(pixels):
            budget_peak[0] = max(budget_peak[0], PIXELS_IN_FLIGHT.held)
            time.sleep(0.01)
            yield

    try:
        PIXELS_IN_FLIGHT.hold = watched  # type: ignore[method-assign]
        source = open_storage(str(tmp_path))
        rows, corrupt, _ = check_images(source, list(source.list()), 10**9, True, 16, threads)
    finally:
        PIXELS_IN_FLIGHT.hold = original  # type: ignore[method-assign]
        PIXELS_IN_FLIGHT.set_limit(limit)
    assert len(rows) == 6 and not corrupt
    assert budget_peak[0] == 50 * 40


def test_pixels_in_flight_default_to_the_bomb_limit_and_can_be_set() -> None:
    from flows.steps import CheckSettings
    from tasks.config import load_config

    base = ["input=in", "output=out", "stopping_condition.n_samples=1"]
    default = load_config(None, [*base, "corruptness_check.max_image_pixels=5000"])
    assert CheckSettings.of(default, 64).pixels_in_flight == 5000
    explicit = load_config(None, [*base, "corruptness_check.pixels_in_flight=700"])
    assert CheckSettings.of(explicit, 64).pixels_in_flight == 700
