"""A readable start: the config, the environment report and the model go to files in the output
folder, the terminal (here a captured, non-tty stdout) gets neither them nor colour codes, nor
known third-party warnings."""

import subprocess
import sys
import warnings

from detectron2.engine import default_argument_parser
from helpers import REPO_ROOT

from saltnet.config.load import load_config
from saltnet.engine import SALTNetTrainer
from saltnet.engine.setup import setup
from saltnet.utils.known_warnings import ignore_known_warnings

CONFIG = str(REPO_ROOT / "configs" / "quick_schedule" / "salt_R_18_synthetic.yaml")


def test_setup_and_model_print_go_to_the_output_folder(tmp_path, capsys):
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(tmp_path), "MODEL.DEVICE", "cpu"])
    setup(cfg, default_argument_parser().parse_args(["--config-file", CONFIG]))
    SALTNetTrainer.build_model(cfg)
    terminal = capsys.readouterr().out

    assert "Full config saved to" in terminal  # the terminal says where the files are
    assert "Model printed to" in terminal
    for long_record in ("Running with full config", "Environment info", "Contents of args"):
        assert long_record not in terminal
    assert "SALTHead(" not in terminal
    assert "\x1b[" not in terminal  # no ANSI colour codes

    log = (tmp_path / "log.txt").read_text()
    assert "Running with full config" in log and "Environment info" in log
    assert (tmp_path / "config.yaml").read_text().startswith("CUDNN_BENCHMARK")
    assert "SALTHead(" in (tmp_path / "model.txt").read_text()


# The warnings as torch and detectron2 raise them: (message, category, attributed module).
RAISED = [
    ("`torch.jit.script` is deprecated. Please switch to ...", FutureWarning, "torch.jit._script"),
    ("pkg_resources is deprecated as an API. See ...", UserWarning, "detectron2.config.lazy"),
    ("pkg_resources is deprecated as an API.", UserWarning, "detectron2.model_zoo.model_zoo"),
]


def test_known_warnings_are_filtered_by_message_and_module():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_known_warnings()
        for message, category, module in RAISED:
            warnings.warn_explicit(message, category, "third_party.py", 1, module=module)
            warnings.warn_explicit(message, category, "ours.py", 1, module="saltnet.elsewhere")
        warnings.warn_explicit("another", FutureWarning, "x.py", 1, module="torch.jit._script")
    assert [w.filename for w in caught] == ["ours.py"] * len(RAISED) + ["x.py"]


def test_a_lazyconfig_start_prints_no_known_warning():
    """Importing saltnet first (as the entry points do) hides the warnings that detectron2's import
    and LazyConfig loading raise; ``-W default`` would show them otherwise."""
    lazy = REPO_ROOT / "configs" / "quick_schedule" / "fcos_salt_R_18_synthetic.py"
    code = f"import saltnet; saltnet.load_config({str(lazy)!r}, [])"
    run = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True
    )
    assert "Warning" not in run.stderr, run.stderr
