"""Plan stage: the plan document and its validation (``plan``), the budgeted allocation (``budget``),
the plan picture (``plot``)."""
