"""The LLM back end: one Chat Completions client, a response cache, integrity gates, and the
agents that use them for intent, planning, writing and evaluation.

Nothing here is imported unless a model is configured (``PROWZI_LLM_MODEL`` or ``prowzi run
--llm MODEL``): the offline agents stay the default and need none of it.
"""
