"""The cloud's daemon side: module bank versions, merging, redistribution; and the `eclm-cloud` CLI."""
