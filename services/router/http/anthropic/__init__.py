"""Anthropic's Messages API on the router (`/v1/messages`, `/v1/messages/count_tokens`)."""
