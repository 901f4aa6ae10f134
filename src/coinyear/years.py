"""The span of years a coin date may take: one place, imported by settings, data checks and the served model
(which must not import the settings machinery)."""

# The OCRE reference data spans 32 BC .. AD 138; a coin dating system should still accept the whole span of
# coinage (c. 700 BC to today), and nothing else: years outside it are typos, not coins.
MIN_YEAR = -700
MAX_YEAR = 2100
