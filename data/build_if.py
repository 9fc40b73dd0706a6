"""
Build the pipeline's instruction-following (IF) data, the skill Tulu 3 trains in all three stages, with no stronger
model than the one being trained:

    python data/build_if.py      # -> data/if_sft.jsonl, data/if_rlvr.jsonl, data/if_heldout.jsonl (~5 min on 2 cores)

A prompt is a base instruction ("Write a short poem about lighthouses.") followed by one or two verifiable constraints
("Do not use any commas in your reply."), the kinds IFEval checks. Three sets:
- if_sft.jsonl (SFT): the embedded model answers each base instruction WITHOUT constraints (greedy), and the answer is
  rewritten by code to satisfy the constraints (lowercased, commas removed, a title or an end phrase added, cut under
  a word limit, ...). Every rewritten answer is checked by both verifiers (Google's meaning, as eval.py scores, and the
  Tulu RLVR meaning, as rlvr.py rewards) and kept only if it passes both.
- if_rlvr.jsonl (RLVR): other training prompts, in the Tulu RLVR format (`messages`, `ground_truth` = the Tulu
  {"func_name": ...} JSON list, `dataset` = "ifeval"); the DPO pairs are sampled on these prompts too
  (data/build_dpo_if.py).
- if_heldout.jsonl (eval.py --task ifheldout): IFEval's format (`key`, `prompt`, `instruction_id_list`, `kwargs`).
  What makes it held out: its topics appear in no training prompt, its constraints are worded differently (no 8 words
  in a row shared with a training prompt, so the Tulu decontamination rule links none of them), its end phrases and
  keywords are new, and it pairs constraints more often. Every held-out prompt is satisfiable: a rewrite passing both
  verifiers exists (checked here).
"""
import argparse
import json
import os
import random
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model_name_or_path", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
parser.add_argument("--num_sft", type=int, default=256, help="SFT conversations")
parser.add_argument("--num_rlvr", type=int, default=256, help="RLVR (and DPO) prompts")
parser.add_argument("--num_heldout", type=int, default=240)
parser.add_argument("--max_new_tokens", type=int, default=80, help="for the base answers")
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output_dir", default=os.path.join(ROOT, "data"))

# ----------------------------------------------------------------------------- Base instructions
TASKS = ["Write a short poem about {}.", "Describe {} in a few sentences.", "Give some advice about {}.",
         "Explain {} to a child.", "Write a short story about {}.", "Write a short blog post about {}.",
         "Write a note to a friend about {}.", "Tell me why {} matter to people."]
TRAIN_TOPICS = """sunsets, rainy days, old libraries, city parks, mountain lakes, fresh bread, morning coffee, trains,
bicycles, gardens, thunderstorms, snowy mornings, summer festivals, lighthouses, farmers markets, beaches, forests,
rivers, birthdays, school lunches, museums, street music, night skies, autumn leaves, kites, picnics, campfires,
board games, public buses, bridges, windmills, bakeries, puppies, kittens, owls, bees, whales, dolphins, horses,
penguins, tomatoes, apples, soup, pancakes, tea, honey, libraries, notebooks, pencils, maps, clocks, umbrellas,
sneakers, hats, letters, postcards, radios, photographs, paintings, violins, drums, choirs, theaters, circuses,
zoos, aquariums, castles, villages, harbors, islands, deserts, caves, waterfalls, volcanoes, glaciers, meadows,
orchards, vineyards, greenhouses, kitchens, attics, balconies, porches, staircases, elevators, subways, airports,
road trips, sailboats, canoes, swimming pools, tennis, chess, marathons, yoga, dancing, knitting, pottery, baking,
recycling, composting, volunteering, neighbors, grandparents, teachers, nurses, firefighters, mail carriers,
first jobs, job interviews, moving house, learning to swim, learning a language, saving money, sleeping well""".split(",")
HELDOUT_TOPICS = """rainbows, fog, pine trees, tulips, sunflowers, foxes, turtles, butterflies, parrots, goldfish,
strawberries, pizza, noodles, cheese, lemonade, ice cream, chocolate, sandwiches, bookshops, cinemas, playgrounds,
stadiums, lakeside cabins, hiking trails, rooftops, fountains, statues, markets at night, skateboards, scooters,
hot air balloons, rockets, telescopes, robots, calculators, keyboards, lamps, candles, blankets, pillows, mirrors,
wallets, backpacks, sweaters, gloves, scarves, birthdays at school, family dinners, weekend mornings, spring cleaning,
gardening tools, bird songs, ocean waves, desert nights, city lights, quiet evenings, snowmen, sandcastles,
fireflies, thank you notes""".split(",")
TRAIN_TOPICS = [t.strip() for t in TRAIN_TOPICS]
HELDOUT_TOPICS = [t.strip() for t in HELDOUT_TOPICS]
assert not set(TRAIN_TOPICS) & set(HELDOUT_TOPICS)

# ----------------------------------------------------------------------------- Constraints
# One entry per kind: the Google IFEval id (eval.py's check), the Tulu RLVR func_name (rlvr.py's reward), wordings
# (training / held-out: never 8 words in a row in common), parameters (training / held-out) and the rewrite that makes
# an answer follow it. Held-out end phrases and keywords are new; word limits and markers are IFEval's usual values.
TRAIN_END = ["Thank you for reading.", "Have a nice day.", "That is all.", "Let me know if you have questions."]
HELDOUT_END = ["Hope this helps.", "See you soon.", "Stay curious."]
TRAIN_WORDS = ["blue", "happy", "window", "music", "river", "green", "friend", "light", "simple", "morning",
               "quiet", "bright", "travel", "garden", "warm", "story"]
HELDOUT_WORDS = ["golden", "gentle", "journey", "silver", "smile", "kind", "calm", "wonder", "home", "little"]
ANSWER_WORDS = 36  # the SFT answers are the base answer's first sentences, fewer than this many words
NOTES = ["I hope you enjoyed this.", "Thanks for asking.", "Have a great day.", "Write back soon."]


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def limit_words(text, n):
    kept = []
    for s in sentences(text):
        if len(" ".join(kept + [s]).split()) >= n:
            break
        kept.append(s)
    return " ".join(kept) if kept else " ".join(text.split()[: n - 1])


def highlight(text, n):
    parts = sentences(text)
    if len(parts) < n:
        return None
    return " ".join(f"*{s}*" if i < n else s for i, s in enumerate(parts))


KINDS = {
    "lowercase": dict(
        google="change_case:english_lowercase", tulu="validate_lowercase",
        train=["Your entire response should be in English, and in all lowercase letters.",
               "Write your whole answer in lowercase letters only.", "Use lowercase letters only, with no capital letters."],
        heldout=["Reply in lowercase only, please: no capitals at all."],
        rewrite=lambda t, p, c: t.lower(), order=5),
    "no_comma": dict(
        google="punctuation:no_comma", tulu="validate_no_commas",
        train=["In your entire response, refrain from the use of any commas.", "Do not use any commas in your answer.",
               "Write without commas."],
        heldout=["Avoid commas completely in the reply."],
        rewrite=lambda t, p, c: re.sub(r"\s*,\s*", " ", t).strip(), order=6),
    "end": dict(
        google="startend:end_checker", tulu="validate_end", values=(TRAIN_END, HELDOUT_END),
        kwargs=lambda p: {"end_phrase": p},
        train=['Finish your response with this exact phrase "{}". No other words should follow this phrase.',
               'End your answer with the phrase "{}".', 'Your last words must be "{}".'],
        heldout=['Close the reply with the exact words "{}" and stop there.'],
        rewrite=lambda t, p, c: f"{t} {p}", order=4),
    "quotation": dict(
        google="startend:quotation", tulu="validate_quotation",
        train=["Wrap your entire response with double quotation marks.", "Put your whole answer in double quotes.",
               "Enclose the answer in double quotation marks."],
        heldout=['Place the entire reply inside double quotation marks, like "this".'],
        rewrite=lambda t, p, c: f'"{t}"', order=9),
    "title": dict(
        google="detectable_format:title", tulu="validate_title",
        train=["Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
               "Give your answer a title in double angular brackets, like <<my title>>.",
               "Start with a title inside double angular brackets."],
        heldout=["Begin the reply with a title between double angular brackets, e.g. <<a day out>>."],
        rewrite=lambda t, p, c: f"<<{c['topic'].title()}>>\n\n{t}", order=2),
    "postscript": dict(
        google="detectable_content:postscript", tulu="verify_postscript", values=(["P.S.", "P.P.S"], ["P.S.", "P.P.S"]),
        kwargs=lambda p: {"postscript_marker": p},
        train=["At the end of your response, please explicitly add a postscript starting with {}",
               "Add a postscript at the end that starts with {}", "End with a postscript beginning with {}"],
        heldout=["After the main text, add a short postscript that begins with {}"],
        rewrite=lambda t, p, c: f"{t}\n\n{p} {c['note']}", order=3),
    "max_words": dict(
        google="length_constraints:number_words", tulu="validate_word_constraint", values=([20, 30, 40], [25, 35]),
        kwargs=lambda p: {"num_words": p, "relation": "less than"}, tulu_kwargs=lambda p: {"N": p, "quantifier": "less than"},
        train=["Answer with less than {} words.", "Your response should contain fewer than {} words.", "Use fewer than {} words."],
        heldout=["Keep the reply under {} words."],
        rewrite=lambda t, p, c: limit_words(t, p - 8), order=0),  # room for what other rewrites add
    "keywords": dict(
        google="keywords:existence", tulu="verify_keywords", values=(TRAIN_WORDS, HELDOUT_WORDS),
        kwargs=lambda p: {"keywords": p}, tulu_kwargs=lambda p: {"keyword_list": p}, pair=True,
        train=["Include the keywords {} and {} in the response.", "Make sure to use the words {} and {}.",
               "Use the words {} and {} in your answer."],
        heldout=["Somewhere in the reply, include the words {} and {}."],
        rewrite=lambda t, p, c: f"{t} It makes me think of {p[0]} and {p[1]} things.", order=1),
    "highlights": dict(
        google="detectable_format:number_highlighted_sections", tulu="validate_highlighted_sections", values=([2], [2]),
        kwargs=lambda p: {"num_highlights": p}, tulu_kwargs=lambda p: {"N": p},
        train=["Emphasize at least {} phrases of your answer in markdown italics, *like so*.",
               "Mark at least {} parts of your answer as *highlighted text*.",
               "Highlight at least {} sentences with markdown, *like this*."],
        heldout=["Use markdown to highlight at least {} sentences, for example *this one*."],
        rewrite=lambda t, p, c: highlight(t, p), order=1),
}
CONFLICTS = {frozenset(k) for k in [("quotation", "end"), ("quotation", "postscript"), ("end", "postscript"),
                                    ("lowercase", "title"), ("lowercase", "end"), ("lowercase", "postscript"),
                                    ("max_words", "keywords")]}


def phrase(kind, wording, value):
    return wording.format(*value) if KINDS[kind].get("pair") else wording.format(value)


def make_constraints(rng, split, count):
    """[(kind, wording, value)] for one prompt: `count` kinds that do not conflict."""
    while True:
        kinds = rng.sample(sorted(KINDS), count)
        if not any(frozenset(p) in CONFLICTS for p in zip(kinds, kinds[1:])):
            break
    out = []
    for kind in kinds:
        spec = KINDS[kind]
        values = spec.get("values", ([None], [None]))[split == "heldout"]
        value = rng.sample(values, 2) if spec.get("pair") else rng.choice(values)
        out.append((kind, rng.choice(spec[split]), value))
    return out


def google_truth(constraints):
    return ([KINDS[k]["google"] for k, _, _ in constraints],
            [KINDS[k].get("kwargs", lambda p: {})(v) for k, _, v in constraints])


def tulu_truth(constraints):
    truth = []
    for k, _, v in constraints:
        spec = KINDS[k]
        truth.append({"func_name": spec["tulu"], **spec.get("tulu_kwargs", spec.get("kwargs", lambda p: {}))(v)})
    return truth


def rewrite(answer, constraints, context):
    """The answer made to follow every constraint (rewrites applied in a fixed order), or None."""
    text = answer
    for kind, _, value in sorted(constraints, key=lambda c: KINDS[c[0]]["order"]):
        text = KINDS[kind]["rewrite"](text, value, context)
        if not text:
            return None
    return text


def follows_both(response, prompt_text, constraints):
    ids, kwargs = google_truth(constraints)
    google = all(common.ifeval_follow(response, ids, kwargs, prompt_text))
    return google and common.ifeval_rlvr_score(response, tulu_truth(constraints)) == 1.0


def make_prompts(rng, topics, split, n, two_share):
    prompts = []
    for i in range(n):
        topic = topics[i % len(topics)]  # bases do not depend on the rng, so that the cached answers stay valid
        base = TASKS[(i * 3 + i // len(topics)) % len(TASKS)].format(topic)
        constraints = make_constraints(rng, split, 2 if rng.random() < two_share else 1)
        text = " ".join([base] + [phrase(k, w, v) for k, w, v in constraints])
        prompts.append(dict(base=base, topic=topic, prompt=text, constraints=constraints, note=rng.choice(NOTES)))
    return prompts


if __name__ == "__main__":  # (tests import this file for its topic lists)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train_topics = TRAIN_TOPICS[:]
    rng.shuffle(train_topics)
    sft_prompts = make_prompts(rng, train_topics, "train", args.num_sft, two_share=0.3)
    rlvr_prompts = make_prompts(rng, train_topics[::-1], "train", args.num_rlvr, two_share=0.3)
    heldout = make_prompts(rng, HELDOUT_TOPICS, "heldout", args.num_heldout, two_share=0.5)

    # ------------------------------------------------------------------------- The model's own unconstrained answers
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common.require_model_directory(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()
    # cached in data/if_base_answers.jsonl: greedy answers do not change, and generating them is most of the time
    answers_path = os.path.join(args.output_dir, "if_base_answers.jsonl")
    answers = {r["base"]: r["answer"] for _, r in common.load_rows(answers_path)} if os.path.exists(answers_path) else {}
    bases = sorted({p["base"] for p in sft_prompts + heldout} - set(answers))
    for b in tqdm(range(0, len(bases), args.batch_size), desc="base answers"):
        chunk = bases[b:b + args.batch_size]
        texts = [common.render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in chunk]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        for q, ids in zip(chunk, out[:, inputs["input_ids"].shape[1]:]):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            # complete sentences only, markdown and line breaks flattened: a plain paragraph of at most ~50 words
            text = " ".join(re.sub(r"[#*>\-]+\s", " ", text).split())
            answers[q] = limit_words(" ".join(s for s in sentences(text) if s[-1] in ".!?"), 50)
    with open(answers_path, "w") as f:
        f.writelines(json.dumps({"base": q, "answer": answers[q]}) + "\n" for q in sorted(answers))

    # ------------------------------------------------------------------------- SFT: rewritten answers, verified
    sft_rows, dropped = [], 0
    for p in sft_prompts:
        answer = limit_words(answers[p["base"]], ANSWER_WORDS)  # short answers: cheap to train on, and they finish
        response = rewrite(answer, p["constraints"], p) if answer else None
        if response is None or not follows_both(response, p["prompt"], p["constraints"]):
            dropped += 1
            continue
        ids, kwargs = google_truth(p["constraints"])
        sft_rows.append({"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": response}],
                         "instruction_id_list": ids, "kwargs": kwargs, "ground_truth": json.dumps(tulu_truth(p["constraints"]))})
    # every held-out prompt can be followed: some rewrite of its base answer (or a stock one) passes both verifiers
    stock = "This is a simple answer. It has a few short sentences. Each one is clear. That keeps it easy to read."
    followable = [p for p in heldout if any(r is not None and follows_both(r, p["prompt"], p["constraints"])
                                            for r in (rewrite(a, p["constraints"], p) for a in (answers[p["base"]], stock) if a))]
    print(f"held-out: {len(heldout) - len(followable)} prompts dropped (no rewrite passes both verifiers)")
    heldout = followable

    def write(name, rows):
        with open(os.path.join(args.output_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}: {len(rows)} rows")

    write("if_sft.jsonl", sft_rows)
    print(f"  ({dropped} SFT prompts dropped: the rewrite did not pass both verifiers)")
    write("if_rlvr.jsonl", [{"messages": [{"role": "user", "content": p["prompt"]}], "dataset": "ifeval",
                             "ground_truth": json.dumps(tulu_truth(p["constraints"])),
                             "constraint_type": "+".join(k for k, _, _ in p["constraints"])} for p in rlvr_prompts])
    write("if_heldout.jsonl", [{"key": i, "prompt": p["prompt"], "instruction_id_list": google_truth(p["constraints"])[0],
                                "kwargs": google_truth(p["constraints"])[1]} for i, p in enumerate(heldout)])
