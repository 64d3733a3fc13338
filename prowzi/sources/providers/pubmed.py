"""PubMed through NCBI's E-utilities: ``esearch`` for ids, then ``efetch`` for the records.

``GET /esearch.fcgi?db=pubmed&term=...&retstart=S&retmax=N&retmode=json`` answers
``{"esearchresult": {"count": "T", "retstart": "S", "idlist": ["PMID", ...]}}``;
``GET /efetch.fcgi?db=pubmed&id=PMID,...&retmode=xml`` answers a ``PubmedArticleSet``, each
``PubmedArticle`` with ``MedlineCitation/Article/ArticleTitle``, ``Abstract/AbstractText``,
``AuthorList/Author`` (``LastName``, ``ForeName`` or ``CollectiveName``),
``Journal/JournalIssue/PubDate`` (``Year`` or ``MedlineDate``) and
``PubmedData/ArticleIdList/ArticleId[@IdType]`` (``doi``, ``pubmed``). Every request carries
``tool`` and, with a contact, ``email``, as NCBI asks (and ``api_key`` when set).
"""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree

import httpx

from prowzi.sources.providers.base import Page, Provider
from prowzi.sources.providers.records import ProviderRecord
from prowzi.sources.records import normalise_doi, year_of

TOOL = "prowzi"


def _text(element: ElementTree.Element | None) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


class PubMed(Provider):
    name = "pubmed"
    max_page = 200  # ids per efetch call kept to a GET-sized URL

    @property
    def base_url(self) -> str:
        return self.settings.pubmed_url

    def _params(self, **extra: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"db": "pubmed", "tool": TOOL, **extra}
        if self.settings.contact_email:
            params["email"] = self.settings.contact_email
        if self.settings.pubmed_api_key is not None:
            params["api_key"] = self.settings.pubmed_api_key.get_secret_value()
        return params

    async def page(self, client: httpx.AsyncClient, query: str, start: Any, rows: int) -> Page:
        offset = int(start or 0)
        data = await self.get_json(
            client,
            "esearch.fcgi",
            self._params(term=query, retstart=offset, retmax=rows, retmode="json"),
        )
        result = data.get("esearchresult") if isinstance(data, dict) else None
        ids = result.get("idlist") if isinstance(result, dict) else None
        if not isinstance(ids, list):
            raise self.malformed("no esearchresult.idlist")
        ids = [str(i) for i in ids if str(i).isdigit()]
        try:
            total = int(result.get("count", 0)) if isinstance(result, dict) else 0
        except (TypeError, ValueError):
            total = 0
        if not ids:
            return [], None
        articles = await self.get_xml(
            client, "efetch.fcgi", self._params(id=",".join(ids), retmode="xml")
        )
        by_id = {}
        for article in articles.iter("PubmedArticle"):
            record = self.record(article)
            pmid = _text(article.find("MedlineCitation/PMID"))
            if record is not None:
                by_id[pmid] = record
        records = [by_id[i] for i in ids if i in by_id]  # esearch's (relevance) order
        after = offset + len(ids)
        return records, after if after < total else None

    def record(self, article: ElementTree.Element) -> ProviderRecord | None:
        citation = article.find("MedlineCitation")
        if citation is None:
            return None
        pmid = _text(citation.find("PMID"))
        title = _text(citation.find("Article/ArticleTitle"))
        if not title:
            return None
        authors = []
        for author in citation.findall("Article/AuthorList/Author"):
            name = " ".join(
                p for p in (_text(author.find("ForeName")), _text(author.find("LastName"))) if p
            ) or _text(author.find("CollectiveName"))
            if name:
                authors.append(name)
        date = citation.find("Article/Journal/JournalIssue/PubDate")
        year = None
        if date is not None:
            year = year_of(_text(date.find("Year")) or _text(date.find("MedlineDate")))
        abstract = " ".join(
            _text(part) for part in citation.findall("Article/Abstract/AbstractText") if _text(part)
        )
        doi = None
        for article_id in article.findall("PubmedData/ArticleIdList/ArticleId"):
            if article_id.get("IdType") == "doi":
                doi = normalise_doi(_text(article_id))
        return ProviderRecord(
            title=title,
            origin=self.name,
            metadata_source=self.name,
            authors=tuple(authors),
            year=year,
            doi=doi,
            url=f"https://pubmed.ncbi.nlm.nih.gov/{pmid}/" if pmid else None,
            abstract=abstract,
        )
