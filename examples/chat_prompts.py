"""Varied chat prompts for teaching a diffusion LM to chat (examples/adapt_diffusion.py): templates × topics.

Every prompt is one user turn. The families cover what people ask a small assistant: definitions, explanations,
how-tos, lists, short creative writing, comparisons, code, arithmetic and rewriting. The 50 prompts that the
diffusion benchmark asks (tinyvllm/benchmarks/chat_prompts.json) are written apart from these, by hand.
"""
from __future__ import annotations
import random

TOPICS = """photosynthesis; black holes; the water cycle; volcanoes; earthquakes; the immune system; DNA; vaccines;
climate change; renewable energy; solar panels; wind turbines; electric cars; batteries; the internet; Wi-Fi;
machine learning; neural networks; blockchain; cloud computing; encryption; passwords; open source software; Linux;
the Roman Empire; ancient Egypt; the Renaissance; the printing press; the Industrial Revolution; the French
Revolution; the Moon landing; the Silk Road; the Great Wall of China; the Olympic Games; jazz; classical music; the
guitar; the piano; painting with watercolors; photography; cooking pasta; baking bread; coffee; tea; chocolate;
honey bees; dolphins; elephants; octopuses; penguins; cats; dogs; rainforests; deserts; the ocean; coral reefs;
mountains; rivers; the solar system; Mars; Jupiter; the Sun; stars; galaxies; gravity; magnetism; electricity;
light; sound; atoms; chemistry; the periodic table; algebra; geometry; prime numbers; probability; statistics;
budgeting; saving money; inflation; the stock market; taxes; starting a small business; marketing; job interviews;
writing a resume; public speaking; time management; sleep; exercise; running; yoga; meditation; healthy eating;
drinking water; stress; friendship; learning a new language; reading books; libraries; museums; travel to Japan;
travel to Italy; camping; hiking; gardening; growing tomatoes; recycling; composting; plastic pollution; air
quality; trees; mushrooms; weather forecasts; hurricanes; snow; rainbows; clouds; the human brain; the heart;
bones; teeth; memory; dreams; emotions; video games; chess; football; basketball; tennis; swimming; cycling;
movies; theater; poetry; novels; fairy tales; mythology; robots; space travel; satellites; airplanes; trains;
bridges; skyscrapers; 3D printing; smartphones; social media; email etiquette; remote work; teamwork; leadership;
volunteering; kindness; the scientific method; critical thinking; the history of mathematics; maps; languages of
the world; birthdays; holidays; wedding planning; moving to a new city; pets; first aid; fire safety; recycling
electronics; Python programming; JavaScript; SQL databases; version control with git; web browsers; operating
systems""".replace("\n", " ").split("; ")

QUESTION = ["What is {t}?", "Explain {t} in simple terms.", "Explain {t} to a ten-year-old.",
            "Why is {t} important?", "How does {t} work?", "Tell me three interesting facts about {t}.",
            "What are the main ideas behind {t}?", "Give me a short overview of {t}.",
            "What are common misconceptions about {t}?", "What should a beginner know about {t}?",
            "Summarize the history of {t} in a few sentences.", "What are the pros and cons of {t}?",
            "Write one paragraph about {t}.", "Can you describe {t} in two sentences?",
            "What questions do people often ask about {t}?", "How has {t} changed over time?",
            "What is the connection between {t} and everyday life?", "Give me a fun fact about {t}."]
CREATIVE = ["Write a short poem about {t}.", "Write a haiku about {t}.", "Write a limerick about {t}.",
            "Write a very short story that involves {t}.", "Write a tweet about {t}.",
            "Write a catchy slogan about {t}.", "Describe {t} as if you were a pirate.",
            "Write a friendly note to a friend about {t}.", "Write a riddle whose answer is {t}."]
COMPARE = ["Compare {t} and {u}.", "What do {t} and {u} have in common?", "What is the difference between {t} and {u}?",
           "Which is more interesting, {t} or {u}? Explain briefly."]
HOWTO = ["How do I get started with {a}?", "Give me five tips for {a}.", "What are the first steps of {a}?",
         "List three mistakes to avoid when {a}.", "Make a simple plan for {a} this week.",
         "How can I get better at {a}?"]
ACTIVITIES = """learning to cook; learning to code; learning to draw; running a marathon; saving for a vacation;
studying for an exam; writing an essay; keeping a journal; waking up early; organizing my desk; planting a garden;
training a puppy; making new friends; speaking in public; reading more books; learning to swim; playing the
guitar; taking better photos; drinking less coffee; reducing screen time; eating more vegetables; cleaning my
room; planning a road trip; learning French; building a website; fixing a bike; painting a room; hosting a
dinner party; staying focused; managing a team""".replace("\n", " ").split("; ")
CODE = ["Write a Python function that {c}.", "How would you {c} in Python? Show the code.",
        "Write a short JavaScript function that {c}.", "Explain how to {c} in Python, with an example."]
CODE_TASKS = """reverses a string; checks if a number is prime; computes the factorial of a number; finds the
largest element of a list; counts the vowels in a string; checks if a word is a palindrome; sums the even numbers
in a list; returns the Fibonacci numbers up to n; removes duplicates from a list; sorts a list of names; converts
Celsius to Fahrenheit; reads a text file and counts its lines; merges two dictionaries; finds the average of a
list; checks if two strings are anagrams; flattens a nested list; counts word frequencies in a sentence; returns
the second largest number in a list; validates an email address; capitalizes every word in a sentence; computes
the greatest common divisor of two numbers; generates a random password; finds the minimum and maximum of a
list; checks whether a year is a leap year""".replace("\n", " ").split("; ")
REWRITE = ["Rewrite this sentence to sound more formal: \"{s}\"", "Make this sentence shorter: \"{s}\"",
           "Fix the grammar in this sentence: \"{s}\"", "Translate into French: \"{s}\"",
           "What is the tone of this sentence? \"{s}\"", "Continue this story in two sentences: \"{s}\""]
SENTENCES = ["me and him goes to the store yesterday", "I think we should maybe try to finish the project soon",
             "The weather today is really nice and sunny", "Can you send me the report when you have time",
             "She don't like the new office very much", "Our team won the game last night",
             "The cat sat on the window and watched the birds", "I am very excited about the trip next week",
             "It was a dark and stormy night", "The meeting has been moved to Thursday afternoon",
             "He forgot his keys again this morning", "We need more volunteers for the school fair"]


def arithmetic(rng: random.Random) -> str:
  a, b = rng.randint(2, 99), rng.randint(2, 99)
  form = rng.choice(["What is {a} plus {b}?", "What is {a} times {b}?", "What is {a} minus {b}?",
                     "If I have {a} apples and buy {b} more, how many do I have?",
                     "A train travels {a} miles per hour for {b} hours. How far does it go?",
                     "Is {a} an even or an odd number?", "What is {a} percent of {b}00?"])
  return form.format(a=a, b=b)


def training_prompts(n: int, seed: int = 0) -> list[str]:
  """`n` distinct prompts, drawn from the families above in fixed proportions."""
  rng, seen, out = random.Random(seed), set(), []
  families = [(0.38, lambda: rng.choice(QUESTION).format(t=rng.choice(TOPICS))),
              (0.14, lambda: rng.choice(CREATIVE).format(t=rng.choice(TOPICS))),
              (0.08, lambda: rng.choice(COMPARE).format(t=rng.choice(TOPICS), u=rng.choice(TOPICS))),
              (0.14, lambda: rng.choice(HOWTO).format(a=rng.choice(ACTIVITIES))),
              (0.12, lambda: rng.choice(CODE).format(c=rng.choice(CODE_TASKS))),
              (0.06, lambda: arithmetic(rng)),
              (0.08, lambda: rng.choice(REWRITE).format(s=rng.choice(SENTENCES)))]
  weights = [w for w, _ in families]
  while len(out) < n:
    prompt = rng.choices(families, weights)[0][1]()
    if prompt not in seen: seen.add(prompt); out.append(prompt)
  return out
