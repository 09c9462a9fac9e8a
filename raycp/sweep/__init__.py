"""The paper's sweeps as Ray Tune experiments (issue 15): ``raycp sweep lambda`` (sphering λ,
Fig. 6B). The cores (``lambdas``) are numpy; Ray Tune is imported only by ``tuning``."""
