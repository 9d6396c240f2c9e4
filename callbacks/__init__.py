"""jaxfit's built-in callback plugins, imported as ``jaxfit.callbacks``.

Each lives in its own module and uses only the public callback protocol
(``jaxfit.Callback``); third-party callbacks register under the ``jaxfit.callbacks``
entry-point group and are listed, with these, by :func:`available`.
"""

if __name__ != "jaxfit.callbacks":  # the folder is a plugin directory, not a package of its own
    raise ImportError("import the built-in callbacks as `jaxfit.callbacks`, not as a top-level `callbacks`")

from jaxfit.history import History as History

from ._monitor import MonitorCallback as MonitorCallback
from ._plugins import available as available
from ._plugins import load as load
from .csv_logger import CSVLogger as CSVLogger
from .early_stopping import EarlyStopping as EarlyStopping
from .lambda_callback import LambdaCallback as LambdaCallback
from .lr_monitor import LearningRateMonitor as LearningRateMonitor
from .lr_scheduler import LRScheduler as LRScheduler
from .model_checkpoint import ModelCheckpoint as ModelCheckpoint
from .reduce_on_plateau import ReduceOnPlateau as ReduceOnPlateau
from .rich_progress import RichProgress as RichProgress
from .tensorboard import TensorBoard as TensorBoard
from .terminate_on_nan import TerminateOnNaN as TerminateOnNaN
from .timer import Timer as Timer
