"""Other libraries' chatter goes to the rank log, everything else to the terminal; --verbose shows it all
(tests/integration/test_chat.py checks a real zero3 run's terminal and rank logs)."""

import io
import logging

import pytest

from launcher import quiet


@pytest.fixture
def chatter(monkeypatch, tmp_path):
    """A fresh place for the diverted messages, and the verbose switch off."""
    fresh = quiet._Chatter()
    monkeypatch.setattr(quiet, "_chatter", fresh)
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    return fresh


def test_deprecations_from_other_libraries_are_diverted_ours_and_other_warnings_are_not():
    library = "/venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py"
    assert quiet._is_other_libraries_deprecation(FutureWarning, library)
    assert quiet._is_other_libraries_deprecation(DeprecationWarning, library)
    assert not quiet._is_other_libraries_deprecation(UserWarning, library)
    assert not quiet._is_other_libraries_deprecation(FutureWarning, quiet.__file__)


def test_named_user_warnings_are_diverted_and_no_other():
    shard_utils = "/venv/lib/python3.11/site-packages/torch/distributed/fsdp/_shard_utils.py"
    assert quiet._is_named_warning("`_get_pg_default_device` will be deprecated, it only stays ...", shard_utils)
    assert not quiet._is_named_warning("`_get_pg_default_device` will be deprecated", "/work/launcher/train.py")
    assert not quiet._is_named_warning("Found unsharded parameters", shard_utils)


def test_a_named_notice_goes_to_the_rank_log_and_the_rest_to_the_terminal(chatter, monkeypatch, tmp_path):
    logger = logging.getLogger("test_quiet.library")
    logger.propagate = False
    terminal = io.StringIO()
    logger.addHandler(logging.StreamHandler(terminal))
    logger.addFilter(quiet._NoticeFilter("Setting accelerator to CPU"))
    logger.warning("Setting accelerator to CPU. If you have GPU ...")
    logger.warning("zero_optimization.stage3_max_live_parameters is too small")
    logger.error("Setting accelerator to CPU failed")  # errors always reach the terminal
    assert terminal.getvalue().splitlines() == [
        "zero_optimization.stage3_max_live_parameters is too small",
        "Setting accelerator to CPU failed",
    ]
    log = tmp_path / "logs" / "rank-00000.log"
    quiet.to_rank_log(log)  # what was held until the rank knew its log
    assert log.read_text() == "WARNING test_quiet.library: Setting accelerator to CPU. If you have GPU ...\n"

    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    logger.warning("Setting accelerator to CPU again")
    assert terminal.getvalue().splitlines()[-1] == "Setting accelerator to CPU again"


def test_printed_notices_are_held_back_line_by_line_and_nothing_else_is(chatter):
    terminal = io.StringIO()
    out = quiet._PrintedFilter(terminal)
    out.write("step 1/3 loss 5.59")  # a partial line that cannot become a notice is written at once
    assert terminal.getvalue() == "step 1/3 loss 5.59"
    out.write("\nDeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op ")
    assert terminal.getvalue() == "step 1/3 loss 5.59\n"  # may still become the notice: held
    out.write("built successfully\nDeepSpeed says something else\n")
    assert terminal.getvalue() == "step 1/3 loss 5.59\nDeepSpeed says something else\n"
    assert chatter.held == ["DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"]
