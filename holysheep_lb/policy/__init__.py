"""Decisions about a call, each in one place: what an outcome means (:mod:`.classify`)
and what to do next (:mod:`.retry`). The call stages (:mod:`holysheep_lb.call`) obey them."""
