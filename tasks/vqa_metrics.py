"""The official metrics of the VQA-style benchmarks, rewritten from their reference scripts.

- **VQAv2** (``vqa_accuracy``): the official evaluation script, ``vqaEval.py`` of
  https://github.com/GT-Vision-Lab/VQA (``PythonEvaluationTools/vqaEvaluation``, as of its 2021 fix): answers
  and prediction lose newlines, tabs and outer spaces; when the ten human answers are not all identical, all
  of them and the prediction go through ``processPunctuation`` and ``processDigitArticle`` (punctuation,
  periods, number words to digits, articles, contractions); the score is the mean over the ten leave-one-out
  subsets of nine humans of ``min(#humans in the subset who gave the answer / 3, 1)``. As in LLaVA's
  pipeline, the prediction is first passed through ``EvalAIAnswerProcessor``
  (``scripts/convert_vqav2_for_submission.py``) — without it a raw "Two" would fail against ten "2"s, since
  the script normalises nothing when the humans agree. ``vqa_official_accuracy`` is the script alone.
- **TextVQA** (``textvqa_accuracy``): LLaVA's evaluator, ``llava/eval/m4c_evaluator.py``
  (``TextVQAAccuracyEvaluator`` with ``EvalAIAnswerProcessor``, from MMF/Pythia): prediction and every human
  answer go through the full EvalAI processing (lower case, ``word_tokenize``, punctuation, numbers,
  articles, contractions), then the same leave-one-out accuracy.
- **GQA** (``gqa_exact_match``): LLaVA's ``scripts/convert_gqa_for_eval.py`` (``rstrip('.')``, lower case)
  then the official GQA ``eval.py`` exact match against the gold answer.
- **POPE** (``pope_yes_no`` and ``pope_scores``): LLaVA's ``llava/eval/eval_pope.py``: keep the first
  sentence, drop commas, split on spaces; ``no`` if the words contain ``No``, ``no`` or ``not``, else ``yes``;
  accuracy, precision, recall, F1 with ``yes`` as the positive class, and the yes ratio.

Quirks kept on purpose (they change scores): the period rule ``(?!<=\\d)(\\.)(?!\\d)`` is a negative
*look-ahead* for the text ``<=digit`` (a typo of a look-behind), so it removes every period not followed by a
digit; both scripts pass ``re.UNICODE`` as the ``count`` of ``re.sub`` (at most 32 periods removed); a
punctuation mark is deleted outright (not replaced by a space) when the raw text has it next to a space, or
has a digit-comma-digit anywhere, else replaced by a space; the apostrophe is not a punctuation mark, so
"can't" stays "can't" and "cant" becomes "can't".

The tables (contractions, number words, articles, punctuation) are those of the two scripts, which agree;
written out here in a compact form of our own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# --- the normalisation tables (shared by the official script, as of its 2016 apostrophe fix, and EvalAI) -----

# Contractions written without their apostrophes -> the usual spelling. The table of vqaEval.py, laid out here
# as (written-as, meaning) pairs; "somebody'd" -> "somebodyd" is an odd entry of the original, kept as is.
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll
let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't
ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've
she's she's|shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've
somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll
somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've
someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd|thered've there'd've
there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've
theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've
weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll
whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_PAIRS.replace("\n", "|").split("|") if pair)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")  # EvalAIAnswerProcessor


def _punctuation(text: str, comma: re.Pattern) -> str:
    out = text
    digit_comma = comma.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE (32) lands in re.sub's `count`


def _digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


# --- the official VQA script (vqaEval.py) ---------------------------------------------------------------


def vqa_process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``."""
    return _punctuation(text, VQA_COMMA_STRIP)


def vqa_process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower case, number words to digits, articles dropped, contractions."""
    return _digit_article(text)


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of ``min(#matches in the subset / 3, 1)``."""
    if not answers:
        return 0.0
    accs = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_official_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``VQAEval.evaluate`` for one question: answers and prediction cleaned (newlines, tabs, outer spaces);
    when the human answers are not all the same, both sides get processPunctuation + processDigitArticle;
    then the leave-one-out accuracy."""
    pred, gts = _clean(prediction), [_clean(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [vqa_process_digit_article(vqa_process_punctuation(a)) for a in gts]
        pred = vqa_process_digit_article(vqa_process_punctuation(pred))
    return leave_one_out_accuracy(pred, gts)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy as LLaVA gets it: the prediction goes through ``EvalAIAnswerProcessor`` (LLaVA's
    ``scripts/convert_vqav2_for_submission.py``) and the evaluation server runs ``vqaEval.py``."""
    return vqa_official_accuracy(evalai_normalize(prediction), answers)


# --- LLaVA's TextVQA evaluator (m4c_evaluator.py, EvalAIAnswerProcessor) ---------------------------------


def evalai_normalize(text: str) -> str:
    """``EvalAIAnswerProcessor.__call__``."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean(text)
    return _digit_article(_punctuation(text, EVALAI_COMMA_STRIP))


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy (``TextVQAAccuracyEvaluator``): both sides EvalAI-normalised, leave-one-out."""
    return leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


# --- GQA -------------------------------------------------------------------------------------------------


def gqa_exact_match(prediction: str, answer: str) -> float:
    """LLaVA's GQA conversion (``rstrip('.')``, lower case) and the official exact match."""
    return float(prediction.rstrip(".").lower() == str(answer).lower())


# --- POPE ------------------------------------------------------------------------------------------------


def pope_yes_no(text: str) -> str:
    """LLaVA's ``eval_pope.py``: first sentence, commas dropped, ``no`` if a word is No/no/not, else ``yes``."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class ``yes``) and the yes ratio of yes/no predictions;
    an undefined ratio (no positive predictions or labels) is 0."""
    pred = [p == "yes" for p in predictions]
    gold = [str(lab).lower() != "no" for lab in labels]  # the reference: anything but "no" is a yes label
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    n = max(1, len(pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / n}
