"""Records: run records, the experiment registry, judgements, ratings, reports, preference export."""
