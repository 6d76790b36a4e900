"""The README's main job runs end to end with tiny arguments."""

from __future__ import annotations

import logging
import math

from conftest import load_example


def test_quickstart_runs(tmp_path):
    module = load_example("quickstart")
    args = module.parse_args(["--num-steps", "3", "--num-draws", "50", "--dim", "3"])
    args.outdir = str(tmp_path)
    rows = module.main(args)
    assert [row["guide"] for row in rows] == 2 * list(module.GUIDES)
    assert all(math.isfinite(row["elbo"]) for row in rows)
    ours = [row for row in rows if "pyro" not in row["guide"]]
    assert not any(row["impossible"] for row in ours)
    assert (tmp_path / "quickstart.csv").read_text().count("\n") == len(rows) + 1
    for figure in ("funnel_draws.png", "elbo_traces.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure


def test_quickstart_quiets_only_the_plate_guess(caplog):
    module = load_example("quickstart")
    logger = logging.getLogger("pyro.infer.elbo")
    with caplog.at_level(logging.INFO, logger="pyro"):
        with module.quiet_plate_guess():
            logger.info("Guessed max_plate_nesting = 1")
            logger.info("another message")
        logger.info("Guessed max_plate_nesting = 2")
    assert [r.getMessage() for r in caplog.records] == [
        "another message",
        "Guessed max_plate_nesting = 2",
    ]
