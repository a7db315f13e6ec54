"""One call as a pipeline of small stages (see docs/design-pipeline.md)::

    CostsStage (costs.py)       cache lookup, budget admission, settlement
      -> ChainStage (chain.py)  model chain: fallbacks, model breaker permit, rate limits
        -> AttemptStage (attempts.py)  pick -> permit -> send -> release; obeys RetryPolicy
          -> HedgeStage (hedge.py)     a slow attempt gets a hedged copy (Hedger)
            -> NodeAttempt (attempts.py) one attempt on one node
              -> JsonSender / StreamSender (attempts.py / stream.py)

Each stage holds its collaborators and a ``next`` stage, and runs one
:class:`~holysheep_lb.call.context.CallContext`; tests drive each against a fake next stage.
"""
