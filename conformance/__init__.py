"""kho-conform: the kernel's KHO code held against the reference model.

Importing the package loads the compiled reference model
(``native.compiled_model``) before any module of the model is imported."""

from .native.compiled_model import use_compiled_model

use_compiled_model()
