"""The machine's facts (cgroup v1 and v2 trees fabricated here), the plan, and validation:
over-asks fail at once with the step, the ask, what exists and the fix; `auto` never
over-asks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.config import load_config, parse_memory
from tasks.errors import ConfigError
from tasks.resources import (
    SAFE_MEMORY_SHARE,
    WORKER_MEMORY,
    Ask,
    Gpu,
    Machine,
    asks_of,
    memory_facts,
    phases,
    plan,
    run_plan,
    usable_cpus,
    validate,
)

GiB = 1 << 30
BASE = ["input=./photos", "output=./out", "stopping_condition.n_samples=5"]


def config(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(None, [*BASE, *overrides])


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def affinity() -> int:
    return len(os.sched_getaffinity(0))


# Facts from fabricated cgroup trees


def test_cgroup_v2_cpu_quota_and_memory_limit_of_the_tightest_level_bind(tmp_path: Path) -> None:
    # The process sits in /app/worker; /app limits memory, the root limits CPU.
    root = write(
        tmp_path / "cgroup",
        {
            "cgroup.controllers": "cpu memory",
            "cpu.max": "50000 100000",
            "memory.max": "max",
            "app/cpu.max": "max 100000",
            "app/memory.max": str(2 * GiB),
            "app/memory.current": str(GiB),
            "app/memory.stat": f"anon 1\ninactive_file {GiB // 2}\n",
            "app/worker/cpu.max": "max 100000",
        },
    )
    proc = write(
        tmp_path / "proc",
        {
            "self/cgroup": "0::/app/worker\n",
            "meminfo": "MemTotal:       16000000 kB\nMemAvailable:   12000000 kB\n",
        },
    )
    assert usable_cpus(root, proc / "self") == min(affinity(), 0.5)
    total, available = memory_facts(root, proc / "self", proc)
    assert total == 2 * GiB
    # the limit less what the cgroup uses beyond reclaimable page cache
    assert available == 2 * GiB - (GiB - GiB // 2)


def test_cgroup_v1_quota_and_limit_are_read_from_the_mounts_root_inside_a_container(
    tmp_path: Path,
) -> None:
    # Inside a container the mount is the container's own cgroup: /docker/abc is absent.
    root = write(
        tmp_path / "cgroup",
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "150000",
            "cpu,cpuacct/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": str(4 * GiB),
            "memory/memory.usage_in_bytes": str(3 * GiB),
            "memory/memory.stat": f"cache 5\ntotal_inactive_file {GiB}\n",
        },
    )
    proc = write(
        tmp_path / "proc",
        {
            "self/cgroup": "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n0::/\n",
            "meminfo": "MemTotal:       33554432 kB\nMemAvailable:   30000000 kB\n",
        },
    )
    assert usable_cpus(root, proc / "self") == min(affinity(), 1.5)
    assert memory_facts(root, proc / "self", proc) == (4 * GiB, 4 * GiB - 2 * GiB)


def test_cgroup_v1_nested_cgroup_and_no_limits_fall_back_to_the_host(tmp_path: Path) -> None:
    root = write(
        tmp_path / "cgroup",
        {
            "cpu/cpu.cfs_quota_us": "-1",
            "cpu/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": "9223372036854771712",
            "memory/jobs/7/memory.limit_in_bytes": "9223372036854771712",
        },
    )
    proc = write(
        tmp_path / "proc",
        {
            "self/cgroup": "2:cpu:/\n1:memory:/jobs/7\n",
            "meminfo": "MemTotal:       8388608 kB\nMemAvailable:   4194304 kB\n",
        },
    )
    assert usable_cpus(root, proc / "self") == affinity()
    assert memory_facts(root, proc / "self", proc) == (8 * GiB, 4 * GiB)


def test_this_machines_own_facts_are_sane() -> None:
    assert 0 < usable_cpus() <= (os.cpu_count() or 1)
    total, available = memory_facts()
    assert 0 < available <= total


# Config: the keys, memory units, the num_workers alias


def test_memory_takes_units_and_bytes() -> None:
    assert parse_memory("2GiB") == 2 * GiB
    assert parse_memory("512MB") == 512_000_000
    assert parse_memory("1.5G") == int(1.5 * GiB)
    assert config("resources.check.memory=4GiB").resources.check.memory == 4 * GiB
    assert config("resources.check.memory=1000").resources.check.memory == 1000
    with pytest.raises(ConfigError, match="resources.check.memory"):
        config("resources.check.memory=lots")
    with pytest.raises(ConfigError, match="resources.embed.num_gpus"):
        config("resources.embed.num_gpus=-1")


def test_num_workers_is_the_num_proc_of_every_step_that_leaves_it_auto() -> None:
    asks = asks_of(config("num_workers=3", "resources.embed.num_proc=2"))
    assert asks["check"].num_proc == 3
    assert asks["train"].num_proc == 3
    assert asks["embed"].num_proc == 2
    assert asks_of(config())["check"].num_proc is None  # -1: auto
    assert asks_of(config("num_workers=0"))["check"].num_proc == 1
    machine = Machine(cpus=8, memory=32 * GiB, available=30 * GiB)
    planned = run_plan(config("num_workers=3"), False, machine)
    assert planned["check"].num_proc == 3


def test_cli_help_and_the_flows_parameter_schema_show_the_resources_keys(capsys) -> None:  # type: ignore[no-untyped-def]
    from prefect.utilities.callables import parameter_schema

    from flows.cli import main
    from flows.curate import curate

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    printed = capsys.readouterr().out
    for key in ("resources.check.num_proc", "resources.embed.num_gpus", "resources.train.memory"):
        assert key in printed
    assert "alias of resources.<step>.num_proc" in " ".join(printed.split())
    schema = parameter_schema(curate).model_dump_for_openapi()
    assert "resources" in schema["properties"]
    step = schema["definitions"]["StepResources"]["properties"]
    assert set(step) == {"num_cpus", "num_gpus", "memory", "num_proc"}
    assert "fraction" in step["num_gpus"]["description"]


# Validation: sequential steps alone, concurrent steps as a sum


TWO_CPUS = Machine(cpus=2, memory=16 * GiB, available=10 * GiB, gpus=())
ONE_GPU = Machine(
    cpus=8, memory=64 * GiB, available=60 * GiB, gpus=(Gpu("H200", 140 * GiB, 139 * GiB),)
)


def planned(machine: Machine, embed_on_gpu: bool, *overrides: str):  # type: ignore[no-untyped-def]
    return run_plan(config(*overrides), embed_on_gpu, machine)


def test_a_step_asking_for_more_cpus_than_exist_fails_naming_step_ask_machine_and_fix() -> None:
    with pytest.raises(ConfigError) as info:
        planned(TWO_CPUS, False, "resources.check.num_cpus=4")
    assert str(info.value) == (
        "resources.check asks for 4 CPUs, this machine has 2: set resources.check.num_cpus=2"
    )


def test_embed_asking_for_gpus_on_a_machine_without_fails_with_the_device_fix() -> None:
    with pytest.raises(ConfigError) as info:
        planned(TWO_CPUS, False, "resources.embed.num_gpus=2")
    assert str(info.value) == (
        "resources.embed asks for 2 GPUs, this machine has 0: set resources.embed.num_gpus=0 "
        "or embedding.device=cpu"
    )


def test_more_memory_than_is_free_fails_with_workers_times_memory() -> None:
    with pytest.raises(ConfigError) as info:
        planned(TWO_CPUS, False, "resources.check.memory=4GiB", "resources.check.num_proc=4")
    message = str(info.value)
    assert message.startswith("resources.check asks for 16.0 GiB of memory (check 4 x 4.0 GiB")
    assert "this machine has 10.0 GiB free" in message
    assert "resources.check.memory" in message


def test_steps_that_take_turns_fit_alone_steps_that_overlap_must_fit_together() -> None:
    asks = ("resources.check.num_cpus=2", "resources.embed.num_cpus=2")
    # Embedding on a CPU: each check waits for the previous embedding, so each fits alone.
    plans = planned(TWO_CPUS, False, *asks)
    assert (plans["check"].num_cpus, plans["embed"].num_cpus) == (2, 2)
    # On a GPU check and embed stream at the same time: the sum must fit.
    two_cpus_one_gpu = Machine(cpus=2, memory=16 * GiB, available=10 * GiB, gpus=ONE_GPU.gpus)
    with pytest.raises(ConfigError) as info:
        planned(two_cpus_one_gpu, True, *asks)
    assert str(info.value) == (
        "resources: check and embed run at the same time and ask for 4 CPUs together "
        "(check 2, embed 2), this machine has 2: lower resources.check.num_cpus or "
        "resources.embed.num_cpus so that they sum to at most 2, or set them auto"
    )


def test_pretagging_and_embedding_overlap_and_share_a_gpu_by_fractions() -> None:
    pretag = ("pretagging.checkpoint=./classifier.safetensors",)
    with pytest.raises(ConfigError, match=r"pretag and embed run at the same time .* 2 GPUs"):
        planned(ONE_GPU, True, *pretag, "resources.pretag.num_gpus=1", "resources.embed.num_gpus=1")
    plans = planned(ONE_GPU, True, *pretag, "resources.pretag.num_gpus=0.25")
    assert plans["pretag"].num_gpus == 0.25
    assert plans["embed"].num_gpus == 0.75  # auto: what the other step leaves
    assert plans["check"].num_gpus == 0  # the check never computes on a GPU
    # Training runs alone: it may have the whole GPU after the checks.
    train = planned(ONE_GPU, True, "enable_training=true", "resources.train.num_gpus=1")
    assert train["train"].num_gpus == 1


def test_more_than_one_gpu_must_be_whole() -> None:
    with pytest.raises(ConfigError, match=r"resources.embed.num_gpus=1.5: more than one GPU"):
        planned(ONE_GPU, True, "resources.embed.num_gpus=1.5")


def test_fitting_asks_pass_and_become_the_plan() -> None:
    plans = planned(
        ONE_GPU,
        True,
        "resources.check.num_cpus=6",
        "resources.check.memory=2GiB",
        "resources.embed.num_cpus=2",
        "resources.embed.num_gpus=0.5",
        "resources.embed.num_proc=2",
    )
    check, embed = plans["check"], plans["embed"]
    assert (check.num_cpus, check.num_proc, check.memory) == (6, 6, 2 * GiB)
    assert check.ray_options() == {"num_cpus": 6, "num_gpus": 0, "memory": 12 * GiB}
    assert embed.ray_options() == {"num_cpus": 2, "num_gpus": 0.5}  # auto memory asks nothing


def test_auto_workers_are_capped_by_the_memory_that_fits() -> None:
    small = Machine(cpus=16, memory=2 * GiB, available=GiB)
    plans = run_plan(config(), False, small)
    # check alone: 80% of 1 GiB holds three 256 MiB workers, not sixteen
    assert plans["check"].num_proc == int(GiB * SAFE_MEMORY_SHARE // WORKER_MEMORY["check"]) == 3
    assert plans["check"].num_cpus == 16


def test_pools_plan_only_what_runs_on_the_pipeline_machine() -> None:
    pooled = config("orchestration.mode=pools", "enable_training=true")
    assert phases(pooled, True, on_this_machine=False) == [("train",)]
    # an over-ask of the check is the CPU workers' to judge, not this machine's
    plans = run_plan(
        config("orchestration.mode=pools", "resources.check.num_cpus=64"),
        False,
        TWO_CPUS,
        on_this_machine=False,
    )
    assert plans == {}


def test_the_cli_rejects_an_impossible_ask_in_one_line_with_exit_2(
    demo_folder, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    from flows.cli import main

    folder, _ = demo_folder
    args = [f"input={folder}", f"output={tmp_path}", "stopping_condition.n_samples=2"]
    assert main(["run", *args, "resources.embed.num_gpus=2", "embedding.device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: resources.embed asks for 2 GPUs, this machine has 0: set "
        "resources.embed.num_gpus=0 or embedding.device=cpu"
    )
    assert not (tmp_path / "runs").exists()  # nothing ran


# auto never over-asks


machines = st.builds(
    Machine,
    cpus=st.sampled_from([0.5, 1, 1.5, 2, 3, 8, 64]),
    memory=st.just(64 * GiB),
    available=st.integers(min_value=1 << 20, max_value=64 * GiB),
    gpus=st.integers(0, 4).map(lambda n: tuple(Gpu("g", 16 * GiB, 16 * GiB) for _ in range(n))),
)


@settings(max_examples=200, deadline=None)
@given(
    machine=machines,
    training=st.booleans(),
    pretag=st.booleans(),
    on_gpu=st.booleans(),
    explicit_cpus=st.dictionaries(
        st.sampled_from(["check", "embed", "train", "pretag"]), st.floats(0, 1)
    ),
)
def test_auto_never_over_asks(
    machine: Machine, training: bool, pretag: bool, on_gpu: bool, explicit_cpus: dict[str, float]
) -> None:
    """Whatever the machine and the steps, auto keys alone (or next to explicit asks
    that leave room) plan within what exists."""
    overrides = [f"enable_training={str(training).lower()}"]
    if pretag:
        overrides.append("pretagging.checkpoint=./c.safetensors")
    cfg = config(*overrides)
    steps = phases(cfg, on_gpu)
    # explicit CPU asks that, phase by phase, sum to at most the machine's CPUs
    per_phase = max(len(p) for p in steps)
    asks = {
        step: Ask(
            num_cpus=None
            if step not in explicit_cpus
            else explicit_cpus[step] * machine.cpus / per_phase
        )
        for step in ("check", "embed", "train", "pretag")
    }
    gpu_steps = ("embed", "train", "pretag") if on_gpu else ()
    plans = plan(asks, steps, machine, gpu_steps)
    validate(plans, steps, machine)  # raises if anything over-asks
    for phase in steps:
        assert sum(plans[s].num_cpus for s in phase) <= machine.cpus + 1e-6
        assert sum(plans[s].num_gpus for s in phase) <= len(machine.gpus or ()) + 1e-6
        share = machine.available * SAFE_MEMORY_SHARE / len(phase)
        for s in phase:  # auto workers fit their share of the safe memory (one always runs)
            assert WORKER_MEMORY[s] * plans[s].num_proc <= share or plans[s].num_proc == 1


def test_a_run_reports_its_plan_and_uses_the_declared_workers(
    demo_folder, run_curate, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    folder, _ = demo_folder
    run = run_curate(
        f"input={folder}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=3",
        "embedding.input_size=32",
        "num_workers=1",
        "resources.check.num_proc=2",
    )
    resources = run.report["resources"]
    assert resources["steps"]["check"]["num_proc"] == 2
    assert resources["steps"]["embed"]["num_proc"] == 1  # num_workers, the alias
    assert resources["machine"]["cpus"] == usable_cpus()
    assert run.report["embedding"]["batch_size"] == 64  # no out-of-memory here


def test_a_pool_worker_plans_and_validates_its_own_step_against_its_own_machine() -> None:
    from flows.steps import CheckJob, CheckSettings

    # The pipeline leaves auto to the worker (-1), and the job carries the ask there.
    auto = CheckSettings.of(config("orchestration.mode=pools"), 64)
    assert auto.num_workers == -1
    assert auto.planned().num_workers == int(usable_cpus())  # this machine's, not the pipeline's
    asked = CheckSettings.of(
        config("orchestration.mode=pools", "resources.check.num_cpus=1000"), 64
    )
    job = CheckJob(shards=[], settings=asked)
    carried = CheckJob(**job.model_dump(mode="json")).settings  # as a deployment run gets it
    with pytest.raises(ConfigError, match=r"^resources.check asks for 1000 CPUs, this machine has"):
        carried.planned()
    alias = CheckSettings.of(config("orchestration.mode=pools", "num_workers=3"), 64)
    assert alias.planned().num_workers == 3
