"""What a run records about its environment, and how `reproduce` names what changed."""

from __future__ import annotations

import torch

from mnist_pipeline.ml import environment


def test_a_training_records_every_environment_tag(tmp_path):
    (tmp_path / environment.LOCK_FILE).parent.mkdir()
    (tmp_path / environment.LOCK_FILE).write_text("torch==2.14.1\n")
    tags = environment.tags(torch.device("cpu"), 2, tmp_path, "bf16")
    assert set(tags) == set(environment.TAGS)
    assert tags[environment.TORCH] == torch.__version__ and tags[environment.THREADS] == "2"
    assert tags[environment.PRECISION] == "bf16"
    assert tags[environment.LOCK_HASH] != environment.lock_hash(tmp_path / "elsewhere") == "none"
    assert tags[environment.CPU_VECTOR] == torch.backends.cpu.get_cpu_capability()
    assert len(tags[environment.PACKAGES_HASH]) == 16 and tags[environment.PACKAGES_HASH] == environment.packages_hash()


def test_differences_name_each_changed_tag_in_order():
    before = {environment.CPU: "AMD EPYC", environment.THREADS: "2", environment.TORCH: "2.14.1", "other": "x"}
    after = {**before, environment.CPU: "Intel Xeon", environment.THREADS: "4", "other": "y"}
    assert environment.differences(before, after) == [
        "env.cpu: 'AMD EPYC' then 'Intel Xeon'",
        "env.threads: '2' then '4'",
    ]
    assert environment.differences(before, before) == []
    older = {k: v for k, v in before.items() if k != environment.TORCH}  # a run made before the tag existed
    assert environment.differences(older, before) == ["env.torch: 'unknown' then '2.14.1'"]
