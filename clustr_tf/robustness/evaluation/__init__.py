"""Robustness evaluation: attacks at every eps, worst cases, certificates, masking checks.

`evaluate_robustness` runs the stages of an evaluation, each a function of its own, and
sums them up: `plan` (the PGD runs of an `EvalConfig`), `clean_pass` (clean decisions and
the certificate), `gradient_attacks`, `stronger_attack` and `gradient_free_attack` (each
narrowing the per-example worst case) and `certified_rule_attack` (the certificate's
empirical check: an example certified at r that l2 PGD breaks at r is a violation, a bug
or an unsound bound). `masking_checks` then tests the result for the signs of gradient
masking that misled readers of the original ClusTR evaluation.

Certification is one forward pass: `certify_split` certifies a whole split (the attacks
run on a subset). `auto_radii` picks the radii to certify and attack for a backbone.

The package is laid out by concept, one module each:

    planning       `EvalConfig`, the radii (`auto_radii`) and the PGD runs (`plan`)
    certification  the clean pass and the certificate (`clean_pass`, `certify_split`)
    attack_stages  the attacks that narrow the worst case, and the certified rule's attack
    robustness     `evaluate_robustness`: the stages in order and the result they sum up to
    masking        `masking_checks`: the signs of gradient masking in a result; `check_outcome`
                   and `checks_summary` say passed, FAILED or not run
"""

from clustr_tf.robustness.evaluation.attack_stages import certified_rule_attack
from clustr_tf.robustness.evaluation.attack_stages import describe
from clustr_tf.robustness.evaluation.attack_stages import gradient_attacks
from clustr_tf.robustness.evaluation.attack_stages import gradient_free_attack
from clustr_tf.robustness.evaluation.attack_stages import stronger_attack
from clustr_tf.robustness.evaluation.certification import certify_split
from clustr_tf.robustness.evaluation.certification import clean_pass
from clustr_tf.robustness.evaluation.masking import check_outcome
from clustr_tf.robustness.evaluation.masking import checks_summary
from clustr_tf.robustness.evaluation.masking import masking_checks
from clustr_tf.robustness.evaluation.planning import DEFAULT_L2_EPS
from clustr_tf.robustness.evaluation.planning import DEFAULT_RADII
from clustr_tf.robustness.evaluation.planning import LIPSCHITZ_RADII
from clustr_tf.robustness.evaluation.planning import LIPSCHITZ_RADII_OTHER
from clustr_tf.robustness.evaluation.planning import EvalConfig
from clustr_tf.robustness.evaluation.planning import auto_radii
from clustr_tf.robustness.evaluation.planning import plan
from clustr_tf.robustness.evaluation.robustness import evaluate_robustness
