import pytest

from megavlm.config.model import ParallelConfig
from megavlm.parallel.init import ParallelLayoutError, _first_slurm_host, check_layout, read_launch_env
from megavlm.parallel.layout import pipeline_layer_ranges


def test_torchrun_variables():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == \
        (3, 8, 1, "h0", 1234, "torchrun")


def test_slurm_variables():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                           "SLURM_JOB_NODELIST": "gpu[003-004,010]", "SLURM_JOB_ID": "77"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 16, 5, "gpu003", "slurm")
    assert env.master_port == 20077


@pytest.mark.parametrize("nodelist, host", [("node1", "node1"), ("a[1-2],b3", "a1"), ("x-[07,09]", "x-07")])
def test_first_slurm_host(nodelist, host):
    assert _first_slurm_host(nodelist) == host


def test_single_process_default():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_layout_check():
    assert check_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 8) == 2
    with pytest.raises(ParallelLayoutError, match=r"world size 6 is not divisible by tensor_parallel \(2\) x pipeline_parallel \(2\)"):
        check_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6)
    with pytest.raises(ParallelLayoutError, match="sequence_parallel"):
        check_layout(ParallelConfig(sequence_parallel=True), 2)


def test_pipeline_layer_ranges_match_megatron_rules():
    assert pipeline_layer_ranges(22, 1) == [(0, 22)]
    assert pipeline_layer_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert pipeline_layer_ranges(22, 4, first=4, last=6) == [(0, 4), (4, 10), (10, 16), (16, 22)]
    assert pipeline_layer_ranges(5, 2, first=2) == [(0, 2), (2, 5)]
    with pytest.raises(ParallelLayoutError, match="22 decoder layers cannot be split over 4"):
        pipeline_layer_ranges(22, 4)
