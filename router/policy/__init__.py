"""The online routing policy: (task cluster, length bucket) -> (drafter, draft length).

Import from the modules (``router.policy.base``, ``router.policy.registry``, ...); this
package file re-exports nothing so importing it stays free.
"""
