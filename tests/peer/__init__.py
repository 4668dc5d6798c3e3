"""A local Coinbase protocol peer (Advanced Trade and Exchange API) for tests of the real ccxt adapters."""
