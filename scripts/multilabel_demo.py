"""A small multi-label data set for the README's walk-through: food-delivery reviews that speak of any of four
topics (taste, delivery, price, packaging), or of none, written from phrase lists with a fixed seed.

    python scripts/multilabel_demo.py OUT_DIR    # writes OUT_DIR/train.csv (1,200 rows) and OUT_DIR/test.csv (300)

The label column holds the topics joined by |, empty for none. Training uses the first six phrases of each
topic; the test file only the last two, wording the model has not seen, so that evaluate shows how far the
fine-tuned sentence encoder carries a topic to new words.
"""
import csv
import os
import random
import sys

TOPICS = {
    "taste": ["the noodles were bland", "the curry was delicious", "the soup tasted of nothing",
              "the chicken was juicy and well seasoned", "the rice was undercooked",
              "the dumplings were the best I have had", "the sauce was far too salty", "the flavours were spot on"],
    "delivery": ["the courier was forty minutes late", "it arrived in under twenty minutes",
                 "the driver could not find the building", "delivery was quick",
                 "the order came an hour after the promised time", "the rider called when he was at the door",
                 "it took ages to arrive", "it was delivered early"],
    "price": ["far too expensive for the portion", "great value for money", "the prices went up again",
              "cheap and filling", "I paid twice what the shop charges", "the discount made it a bargain",
              "overpriced for what you get", "a fair price"],
    "packaging": ["the box was soaked through", "the lid had come off and the bag was a mess",
                  "everything was sealed tightly", "the container leaked on the way", "the packaging kept it hot",
                  "the bag was torn", "nice sturdy boxes", "the drink spilled inside the bag"],
}
NEUTRAL = ["I ordered on a Tuesday evening.", "We were four at home.", "It was my first order from them.",
           "I used the app as usual.", "This was for a birthday dinner.", "Ordered again last night.",
           "My partner chose the menu.", "Lunch at the office today."]


def review(rng: random.Random, phrases: slice) -> tuple[str, str]:
    k = rng.choices([0, 1, 2, 3], weights=[2, 5, 3, 1])[0]
    topics = sorted(rng.sample(sorted(TOPICS), k))
    parts = [rng.choice(TOPICS[t][phrases]) for t in topics]
    rng.shuffle(parts)
    text = " ".join(rng.sample(NEUTRAL, rng.randint(0 if parts else 1, 2)))
    if parts:
        text = (text + " " if text else "") + ", and ".join(parts).capitalize() + "."
    return "|".join(topics), text


def write(path: str, n: int, seed: int, phrases: slice):
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["labels", "review"])
        for _ in range(n):
            out.writerow(review(rng, phrases))


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "multilabel-demo"
    os.makedirs(folder, exist_ok=True)
    write(os.path.join(folder, "train.csv"), 1200, seed=1, phrases=slice(0, 6))
    write(os.path.join(folder, "test.csv"), 300, seed=2, phrases=slice(6, 8))
    print(f"written: {folder}/train.csv, {folder}/test.csv")
