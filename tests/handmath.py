"""Plain-math references for the loss tests: written without torch, so they check it independently."""
import math


def softmax(v, t=1.0):
    e = [math.exp(a / t) for a in v]
    s = sum(e)
    return [a / s for a in e]


def hand_ce(logits, y):
    """Cross-entropy of one row of logits against label y."""
    return math.log(sum(math.exp(a) for a in logits)) - logits[y]


def hand_kl(teacher, student, t):
    """KL(softmax(teacher/t) || softmax(student/t)) for one row."""
    p, q = softmax(teacher, t), softmax(student, t)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def kl(p, q):
    """KL(p || q) of two probability lists (0·log 0 = 0)."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
