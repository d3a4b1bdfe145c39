"""Robustness: attacks and the evaluation that reports them.

    attacks     CleverHans PGD with the official, logits and margin losses, Square, restarts
    evaluation  clean and certified accuracy, worst cases over attacks, masking checks
"""

from clustr_tf.robustness import attacks
from clustr_tf.robustness import evaluation
