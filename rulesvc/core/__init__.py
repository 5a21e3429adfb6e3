"""Pure decisions: no pymongo, aiohttp or asyncio, nothing from store/, runtime/, web/ or replay/."""
