"""polyak: PyTorch optimizers written from scratch, a drop-in for ``torch.optim``."""

from polyak import functional
from polyak._explain import Explanation, GroupPath, explain
from polyak.algorithms.adadelta import Adadelta
from polyak.algorithms.adafactor import Adafactor
from polyak.algorithms.adagrad import Adagrad
from polyak.algorithms.adam import Adam
from polyak.algorithms.adam8bit import Adam8bit, AdamW8bit
from polyak.algorithms.adamax import Adamax
from polyak.algorithms.adamw import AdamW
from polyak.algorithms.adamw_schedulefree import AdamWScheduleFree
from polyak.algorithms.adan import Adan
from polyak.algorithms.ademamix import AdEMAMix
from polyak.algorithms.adopt import ADOPT
from polyak.algorithms.asgd import ASGD
from polyak.algorithms.laprop import LaProp
from polyak.algorithms.lbfgs import LBFGS
from polyak.algorithms.lion import Lion
from polyak.algorithms.muon import Muon
from polyak.algorithms.nadam import NAdam
from polyak.algorithms.radam import RAdam
from polyak.algorithms.radam_schedulefree import RAdamScheduleFree
from polyak.algorithms.rmsprop import RMSprop
from polyak.algorithms.rprop import Rprop
from polyak.algorithms.sgd import SGD
from polyak.algorithms.sgd_schedulefree import SGDScheduleFree
from polyak.algorithms.sparse_adam import SparseAdam
from polyak.algorithms.stable_adamw import StableAdamW
from polyak.optimizer import Optimizer, required

# Functional counterparts for torch.distributed, entered in torch's map when it is loaded.
functional.watch(Optimizer)

__all__ = [
    "ADOPT",
    "ASGD",
    "LBFGS",
    "SGD",
    "AdEMAMix",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "Adam8bit",
    "AdamW",
    "AdamW8bit",
    "AdamWScheduleFree",
    "Adamax",
    "Adan",
    "Explanation",
    "GroupPath",
    "LaProp",
    "Lion",
    "Muon",
    "NAdam",
    "Optimizer",
    "RAdam",
    "RAdamScheduleFree",
    "RMSprop",
    "Rprop",
    "SGDScheduleFree",
    "SparseAdam",
    "StableAdamW",
    "explain",
    "required",
]
__version__ = "0.1.0"
