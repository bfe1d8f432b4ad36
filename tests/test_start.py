"""A readable start: the config, the environment report and the model go to files in the output
folder, the terminal (here a captured, non-tty stdout) gets neither them nor colour codes."""

from detectron2.engine import default_argument_parser
from helpers import REPO_ROOT

from saltnet.config.load import load_config
from saltnet.engine import SALTNetTrainer
from saltnet.engine.setup import setup

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
