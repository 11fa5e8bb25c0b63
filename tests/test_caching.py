"""Cache keys name content: inputs and settings, never timings or thread counts."""

from __future__ import annotations

from tasks.config import StoppingCondition
from tasks.keys import content_key, step_key
from tasks.shards import CheckedShard


def _checked(seconds: float, bytes_read: int, metadata: str = "m") -> CheckedShard:
    return CheckedShard(0, metadata, "c", "i", True, 10, 1, bytes_read, seconds)


def test_a_step_result_recomputed_with_other_timings_keeps_downstream_keys():
    assert content_key("embed", checked=_checked(1.0, 100)) == content_key(
        "embed", checked=_checked(9.0, 0)
    )


def test_other_artifacts_or_settings_change_the_key():
    base = content_key("embed", checked=_checked(1.0, 100), model="resnet18")
    assert base != content_key("embed", checked=_checked(1.0, 100, "m2"), model="resnet18")
    assert base != content_key("embed", checked=_checked(1.0, 100), model="resnet50")
    assert base != content_key("select", checked=_checked(1.0, 100), model="resnet18")


def test_thread_counts_and_batch_sizes_are_not_identity():
    one = step_key("embed", {"model": "resnet18", "num_workers": 1, "batch_size": 8})
    two = step_key("embed", {"model": "resnet18", "num_workers": 4, "batch_size": 64})
    assert one == two


def test_pydantic_settings_are_hashed_by_value():
    assert content_key("s", stop=StoppingCondition(n_samples=5)) == content_key(
        "s", stop=StoppingCondition(n_samples=5)
    )
    assert content_key("s", stop=StoppingCondition(n_samples=5)) != content_key(
        "s", stop=StoppingCondition(n_samples=6)
    )


def test_a_shards_position_in_the_listing_is_not_part_of_its_cache_key() -> None:
    from tasks.shards import Shard

    here = Shard(0, "abc", "cache/shards/abc.jsonl", 10, 1000, "video")
    later = Shard(7, "abc", "cache/shards/abc.jsonl", 10, 1000, "video")
    assert step_key("check_video", {"shard": here, "chunk": 2000}) == step_key(
        "check_video", {"shard": later, "chunk": 500}
    )
