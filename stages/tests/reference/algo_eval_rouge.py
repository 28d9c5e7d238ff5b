"""Reference numbers for stages/src/eval/{rouge,porter}.rs from Google's rouge-score itself.

Uses rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=...)
and nltk.stem.porter.PorterStemmer() (the stemmer rouge-score instantiates), as installed in
/work/pyenv. Run from the repository root:
    /work/pyenv/bin/python stages/tests/reference/algo_eval_rouge.py
It writes stages/tests/reference/algo_eval_rouge.json: the pairs, their scores with and
without stemming, and a table word -> nltk stem covering every rule of the stemmer.
"""
import json
import os
import random
from importlib.metadata import version

from nltk.stem import porter
from rouge_score import rouge_scorer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "algo_eval_rouge.json")

LONG_A = ("The quick brown fox jumps over the lazy dog. " * 12) + "Then it runs away, quickly running home."
LONG_B = ("A quick brown dog jumped over the lazy foxes; " * 10) + "It ran home, and the runners were tired."
PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "the mat sat on the cat"),
    ("The Cat SAT on the MAT!", "the cat, sat; on the mat..."),
    ("", ""),
    ("", "something here"),
    ("something here", ""),
    ("!!! ??? ...", "the answer"),
    ("154", " 154"),
    ("Q: 81+73=\nA: 154", "A: 154"),
    ("3.14159 is pi", "pi is 3 14159"),
    ("the the the the", "the"),
    ("the", "the the the the"),
    ("a b a b a b", "b a b a"),
    ("running runners ran runs", "run runner running"),
    ("generalization of relational databases", "generalized relations in a database"),
    ("He was hopping and hoping", "hoping, hopping, hopped, hoped"),
    ("ponies caresses agreed plastered", "pony caress agree plaster"),
    ("happiness and happily happy", "happy happier happiest"),
    ("universities are universal", "university universe"),
    ("e-mail me at john.doe@example.com", "email john doe example com"),
    ("don't won't can't", "do not will not cannot"),
    ("Café naïve résumé", "cafe naive resume"),
    ("中文 text 123", "text 123 中文"),
    ("tabs\tand\nnewlines  and   spaces", "tabs and newlines and spaces"),
    ("ALL CAPS SENTENCE", "all caps sentence"),
    ("x1 y2 z3", "x1 z3 y2"),
    ("one two three four five six seven eight nine ten", "ten nine eight seven six five four three two one"),
    ("sky skies dying lying news innings", "sky sky die lie news inning"),
    ("national rational conditional", "nation ration condition"),
    ("the police arrested the suspect yesterday", "yesterday the suspect was arrested by police"),
    ("abc", "abcd"),
    ("a", "a"),
    ("it is what it is", "what is it"),
    ("relativity relatively relation relate", "relate relation relative"),
    (LONG_A, LONG_B),
    (LONG_B, LONG_A),
    ("feed feeds feeding fed", "feed"),
    ("goodness gracious", "good grace"),
    ("operator operational operate", "operation"),
    ("1,000,000 dollars", "1 000 000 dollar"),
]

# Random pairs over a vocabulary with punctuation and case noise, seeded.
rng = random.Random(1234)
vocab = ("model models modelling trained training trains reward rewards rewarding policy policies "
         "optimise optimization optimizing the a of and to in is was be 42 7 2024 value values valuable "
         "generate generated generation generator happy happily happiness cats cat's running ran runs").split()
punct = ["", ",", ".", "!", "?", ";", " -", "'s", ":"]
for _ in range(20):
    def sentence():
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 14))]
        words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.1 else w for w in words]
        return " ".join(w + rng.choice(punct) for w in words)
    PAIRS.append((sentence(), sentence()))

scorers = {s: rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=s) for s in (True, False)}


def scores(target, prediction, stem):
    result = scorers[stem].score(target, prediction)
    return {k: {"precision": v.precision, "recall": v.recall, "fmeasure": v.fmeasure} for k, v in result.items()}


pairs = [{"target": t, "prediction": p, "stemmed": scores(t, p, True), "unstemmed": scores(t, p, False)}
         for t, p in PAIRS]

# Stemmer table: real words plus every stem x suffix combination, so each rule fires.
stems = ["gener", "nation", "condit", "hop", "run", "fall", "sens", "form", "relat", "electr", "analog",
         "trip", "defin", "cr", "pl", "agr", "bak", "zip", "fizz", "hiss", "tann", "conflat", "troubl", "siz",
         "happ", "sk", "d", "ab", "oper", "decis", "valu", "adopt", "depend", "irrit", "communi", "bowdler"]
suffixes = ["", "s", "es", "ies", "ed", "ied", "ing", "ly", "li", "al", "ally", "alli", "ation", "ational",
            "tional", "ness", "ful", "fulness", "ive", "iveness", "ize", "izer", "ization", "ism", "ist", "ity",
            "iti", "able", "ible", "ably", "ment", "ement", "ent", "ence", "ance", "logy", "logi", "er", "ers",
            "est", "ic", "ical", "icate", "ous", "ousli", "ousness", "ate", "e", "ll", "y", "eed", "bli", "abli",
            "enci", "anci", "entli", "eli", "aliti", "iviti", "biliti", "fulli", "alism", "alize", "iciti",
            "ative", "ion", "sion", "tion", "ou", "ant", "at", "bl", "iz", "sses", "ss", "yed", "ying"]
words = sorted({s + x for s in stems for x in suffixes} | set(
    "caresses ponies ties caress cats feed agreed disabled matting mating meeting milling messing meetings "
    "plastered bled motoring sing conflated troubled sized hopping tanned falling hissing fizzed failing "
    "filing happy sky skies dying lying tying news innings outings cannings howe proceed exceed succeed "
    "relational conditional rational valenci hesitanci digitizer conformabli radicalli differentli vileli "
    "analogousli vietnamization predication operator feudalism decisiveness hopefulness callousness formaliti "
    "sensitiviti sensibiliti triplicate formative formalize electriciti electrical hopeful goodness revival "
    "allowance inference airliner gyroscopic adjustable defensible irritant replacement adjustment dependent "
    "adoption homologou communism activate angulariti homologous effective bowdlerize probate rate cease "
    "controll roll generously generous fully lly yyy syzygy queuing queue eyes ayy ya yay toy toys boy "
    "crying cried flies dies died lies lied ties tied spied spies bying byes by ion lion nation tion "
    "archaeology theology apology biology".split()))
stemmer = porter.PorterStemmer()
stem_table = {w: stemmer.stem(w) for w in words}

out = {"versions": {"rouge-score": version("rouge-score"), "nltk": version("nltk")},
       "pairs": pairs, "stems": stem_table}
with open(OUT, "w") as fh:
    json.dump(out, fh, indent=1, ensure_ascii=False)
print("wrote", OUT, len(pairs), "pairs", len(stem_table), "stems")
