"""The combined training set of the paper (Moshkov et al. 2024, "Combined training set", Fig. 4):
strong treatments of several screens (sources) and their controls, one training index for
``raycp train``. ``combine`` is the pandas core; ``cli`` is ``raycp trainset combine``."""
