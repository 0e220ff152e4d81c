"""TensorBoard gets the run's config, as W&B does: every field as an hparam (HPARAMS tab) and the YAML as text."""

from __future__ import annotations

import yaml

from ditscale.config import dump_config, load_config
from ditscale.io.rundir import RunDir
from tests.needs import import_or_fail


def test_tensorboard_logger_writes_the_config_as_hparams_and_text(tmp_path):
    import_or_fail("tensorboard", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from ditscale.train.loggers import TensorBoardLogger

    rd = RunDir(str(tmp_path / "run"))
    cfg = load_config("configs/demo.yaml")
    rd.write_text("config.yaml", dump_config(cfg))  # what the trainer records before its loggers start
    tb = TensorBoardLogger(rd, 0)
    tb.log(1, {"loss": 0.5})
    tb.close()

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    start = [
        plugin_data_pb2.HParamsPluginData.FromString(c)
        for c in acc.PluginTagToContent("hparams").values()
        if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info")
    ]
    got = {k: v.string_value or v.number_value or v.bool_value for k, v in start[0].session_start_info.hparams.items()}
    assert got["model.windows"] == cfg.model.windows and got["optim.lr"] == cfg.optim.lr
    assert got["train.steps"] == cfg.train.steps and got["data.train"] == cfg.data.train and "data.test" in got
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load("\n".join(line[4:] for line in text.splitlines())) == yaml.safe_load(dump_config(cfg))
