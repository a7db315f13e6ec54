from django.urls import path

from ask import views

urlpatterns = [path("ask", views.ask)]
