"""Each method's declaration, one module per algorithm module and named like it: its hyperparameters
(a frozen dataclass whose field types carry the allowed ranges, with the paper's defaults) and its
registry entry. They import neither torch nor the algorithm, so the driver checks a grid in well
under a second; the algorithm module imports its params from here and the registry imports it on
the first build."""
