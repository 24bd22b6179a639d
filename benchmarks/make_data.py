"""Write a deterministic social-QA-style multiple-choice data set for the benchmark.

    python benchmarks/make_data.py [--out benchmarks/out] [--test 300] [--train 20]

Each line of test.jsonl / train.jsonl is {"id", "question", "choices" (3 strings),
"answer" (index of the right choice)}. Items are filled from templates with varied names
and situations; a fixed seed makes every run produce byte-identical files. It is a speed
benchmark: the items only need to look like real data, not be hard.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [
    ("Liam", "he", "his"),
    ("Nadia", "she", "her"),
    ("Owen", "he", "his"),
    ("Priya", "she", "her"),
    ("Marcus", "he", "his"),
    ("Sofia", "she", "her"),
    ("Kenji", "he", "his"),
    ("Amara", "she", "her"),
    ("Diego", "he", "his"),
    ("Hannah", "she", "her"),
    ("Tariq", "he", "his"),
    ("Elena", "she", "her"),
    ("Jonah", "he", "his"),
    ("Mei", "she", "her"),
    ("Felix", "he", "his"),
    ("Zara", "she", "her"),
    ("Robin", "they", "their"),
    ("Alex", "they", "their"),
    ("Noah", "he", "his"),
    ("Ines", "she", "her"),
]

# (situation with {n}=name, {p}=pronoun, {s}=possessive; question kind; right answers; wrong answers)
SITUATIONS = [
    (
        "{n} stayed late at work to help a colleague meet a deadline.",
        "How would the colleague feel?",
        ["thankful", "relieved", "grateful to {n}"],
        ["resentful", "bored", "embarrassed to have a job"],
    ),
    (
        "{n}'s cat knocked {s} phone into the bathtub.",
        "How would {n} feel?",
        ["annoyed", "frustrated", "upset about the phone"],
        ["delighted", "proud", "well rested"],
    ),
    (
        "{n} wanted to impress a date, so {p} made a reservation at a fancy restaurant.",
        "What did {n} need to do before this?",
        ["call the restaurant", "pick a restaurant", "check the opening hours"],
        ["learn to cook", "buy a restaurant", "sell {s} car"],
    ),
    (
        "{n} found a wallet on the bus and turned it in to the driver.",
        "How would others describe {n}?",
        ["honest", "thoughtful", "a good person"],
        ["greedy", "careless", "sneaky"],
    ),
    (
        "{n} forgot {s} best friend's birthday this year.",
        "What will {n} want to do next?",
        ["apologize to the friend", "plan a belated celebration", "buy a late present"],
        ["throw a surprise party for nobody", "forget the friend", "move to another city"],
    ),
    (
        "{n} practiced the piano every evening for a month before the recital.",
        "How would {n} feel after a flawless performance?",
        ["proud", "satisfied", "happy with the result"],
        ["ashamed", "confused", "angry at the piano"],
    ),
    (
        "{n} spilled coffee all over a coworker's report.",
        "What will {n} want to do next?",
        ["apologize and help clean up", "offer to reprint the report", "say sorry"],
        ["spill more coffee", "laugh at the coworker", "go home early to sleep"],
    ),
    (
        "{n} lent {s} notes to a classmate who had been sick all week.",
        "How would the classmate feel?",
        ["grateful", "supported", "relieved to catch up"],
        ["insulted", "jealous of {n}", "sleepy"],
    ),
    (
        "{n} signed up for a marathon that is three months away.",
        "What does {n} need to do before the race?",
        ["train regularly", "buy running shoes", "build up endurance"],
        ["skip every workout", "sell {s} shoes", "learn to swim"],
    ),
    (
        "{n} cooked dinner for the whole family on Sunday.",
        "How would the family feel?",
        ["appreciative", "well fed", "happy to eat together"],
        ["hungry", "furious", "ignored"],
    ),
    (
        "{n} got lost driving to a wedding in a new town.",
        "What would {n} do next?",
        ["check a map", "ask someone for directions", "call the hosts"],
        ["go to sleep in the car", "drive home without telling anyone", "buy a new car"],
    ),
    (
        "{n} broke {s} neighbor's window while playing baseball.",
        "What should {n} do next?",
        ["apologize to the neighbor", "offer to pay for the window", "tell the neighbor what happened"],
        ["hide the ball", "break another window", "blame the neighbor"],
    ),
    (
        "{n} won first prize at the science fair.",
        "How would {n} feel?",
        ["excited", "proud", "thrilled"],
        ["disappointed", "bored", "guilty"],
    ),
    (
        "{n} volunteered at the animal shelter all weekend.",
        "Why did {n} do this?",
        ["to help the animals", "because {p} cares about animals", "to give back to the community"],
        ["to avoid animals", "because {p} hates dogs", "to get a parking ticket"],
    ),
    (
        "{n} missed the last train home after the concert.",
        "What will {n} want to do next?",
        ["call a taxi", "find another way home", "ask a friend for a ride"],
        ["buy another concert ticket", "wait for yesterday's train", "start a band"],
    ),
    (
        "{n} told a joke at the meeting and everyone laughed.",
        "How would {n} feel?",
        ["pleased", "amused", "glad people liked it"],
        ["humiliated", "terrified", "lonely"],
    ),
    (
        "{n} studied all night for the final exam.",
        "How would {n} feel the next morning?",
        ["tired", "sleepy", "exhausted but prepared"],
        ["well rested", "energetic from sleeping", "on vacation"],
    ),
    (
        "{n} helped an elderly man carry groceries up the stairs.",
        "How would the man feel?",
        ["thankful", "helped", "grateful for the kindness"],
        ["annoyed", "robbed", "betrayed"],
    ),
    (
        "{n} adopted a puppy from the rescue center.",
        "What will {n} need to do next?",
        ["buy dog food", "take the puppy for walks", "get the puppy a bed"],
        ["return the puppy immediately", "buy a cat", "move to the rescue center"],
    ),
    (
        "{n} received a promotion after years of hard work.",
        "How would {n} feel?",
        ["proud", "rewarded", "happy about the promotion"],
        ["insulted", "unemployed", "worried about being fired"],
    ),
    (
        "{n} lost {s} keys on the way home.",
        "What will {n} want to do next?",
        ["retrace {s} steps", "call a locksmith", "look for the keys"],
        ["throw away the door", "buy a house", "celebrate"],
    ),
    (
        "{n} planted tomatoes in the garden in early spring.",
        "What will {n} need to do next?",
        ["water the plants", "pull the weeds", "wait for the tomatoes to grow"],
        ["dig them up the next day", "paint the tomatoes", "sell the garden"],
    ),
    (
        "{n} accidentally sent a private message to the wrong group chat.",
        "How would {n} feel?",
        ["embarrassed", "mortified", "worried about who saw it"],
        ["victorious", "calm and proud", "hungry"],
    ),
    (
        "{n} surprised {s} parents with tickets to a show.",
        "How would the parents feel?",
        ["delighted", "surprised", "touched by the gift"],
        ["disgusted", "bored", "betrayed"],
    ),
    (
        "{n} noticed a new student sitting alone at lunch and invited them over.",
        "How would others describe {n}?",
        ["friendly", "kind", "welcoming"],
        ["rude", "selfish", "mean"],
    ),
    (
        "{n} fixed the leaking sink without calling a plumber.",
        "How would {n} feel afterwards?",
        ["accomplished", "handy", "proud of the repair"],
        ["helpless", "soaked and defeated", "afraid of water"],
    ),
]

DISTRACTOR_POOL = [
    "go to the moon",
    "eat the homework",
    "sing to the furniture",
    "become a tree",
    "paint the sky green",
    "forget how to walk",
    "count every grain of sand",
]


def make_item(rng: random.Random, idx: int, split: str, used: set) -> dict:
    # Every (name, situation) pair at most once, across splits: no two items share a question,
    # so a tool that skips repeated requests gets no free work.
    while True:
        person, situation_index = rng.randrange(len(NAMES)), rng.randrange(len(SITUATIONS))
        if (person, situation_index) not in used:
            used.add((person, situation_index))
            break
    name, pron, poss = NAMES[person]
    situation, question, right, wrong = SITUATIONS[situation_index]
    fill = lambda t: t.format(n=name, p=pron, s=poss)  # noqa: E731
    correct = fill(rng.choice(right))
    pool = [fill(w) for w in wrong]
    if rng.random() < 0.3:
        pool.append(rng.choice(DISTRACTOR_POOL))
    distractors = rng.sample(pool, 2)
    choices = distractors[:]
    answer = rng.randrange(3)
    choices.insert(answer, correct)
    text = f"{fill(situation)} {fill(question)}"
    text = text[0].upper() + text[1:]
    return {"id": f"{split}-{idx:04d}", "question": text, "choices": choices, "answer": answer}


def write(path: Path, items: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--train", type=int, default=20)
    ap.add_argument("--seed", type=int, default=20240601)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.train + args.test > len(NAMES) * len(SITUATIONS):
        ap.error(f"at most {len(NAMES) * len(SITUATIONS)} items in all")
    rng, used = random.Random(args.seed), set()
    train = [make_item(rng, i + 1, "train", used) for i in range(args.train)]
    test = [make_item(rng, i + 1, "test", used) for i in range(args.test)]
    write(out / "train.jsonl", train)
    write(out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test items to {out}")


if __name__ == "__main__":
    main()
