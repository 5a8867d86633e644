"""Models and variants: where a model comes from (`source`) and the variant spec every candidate is recorded by (`variants`)."""
