"""autoopt adapter, written for autoopt's tests (not part of torchvision): vgg19_paper_init.py beside
this file in the VGG paper's configuration "A" (VGG-11), the one network the paper trains from that
random initialisation: the healthy control. Everything else (init, optimizer, batches) is the same."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_health_outside_vgg19_paper_init",
                                               Path(__file__).with_name("vgg19_paper_init.py"))
_vgg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vgg)
_vgg.CONFIG = "A"

BATCH_SIZE, build_model, make_batch, forward, build_optimizer = (
    _vgg.BATCH_SIZE, _vgg.build_model, _vgg.make_batch, _vgg.forward, _vgg.build_optimizer)
