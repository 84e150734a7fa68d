"""pagedserve: distributed LLM serving on PagedAttention."""
