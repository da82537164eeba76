"""Stream a chat completion from a running `python serve.py` with the official OpenAI SDK (pip install openai)."""
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
model = client.models.list().data[0].id
stream = client.chat.completions.create(model=model, stream=True, max_tokens=64,
                                        messages=[{"role": "user", "content": "Write a haiku about autumn."}])
for chunk in stream:
  if chunk.choices: print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
